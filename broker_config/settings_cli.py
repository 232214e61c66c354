"""Command-line options derived from a pydantic-settings class: each option is declared once.

Why: a component's knobs live in its one settings class (environment variables, .env); the
CLI used to repeat them field by field, with their own types and help, and they drifted. As
arq derives its options from one signature, :func:`settings_options` adds one ``typer`` option
per chosen field (name, type and help from the field, help from its ``description``) and hands
the command only the options that were given, as a dict of overrides for the settings class:
flags override the environment, which overrides the defaults. It lives in ``broker_config``
because every component imports that package and none imports another's.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Optional

import typer
from pydantic import SecretStr
from pydantic_settings import BaseSettings

_SIMPLE = (str, int, float, bool, Path)


def _cli_type(annotation: Any) -> Any:
    """The option's Python type (a Literal stays one: typer checks the choice); TypeError if a
    flag cannot say it."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _cli_type(args[0])
    if origin is Literal:
        return annotation
    if annotation is SecretStr:
        return str
    if annotation in _SIMPLE:
        return annotation
    raise TypeError(f"no command-line form for {annotation!r}")


def option_name(field: str) -> str:
    """A field's command-line option: ``cpus_per_task`` -> ``--cpus-per-task``."""
    return "--" + field.replace("_", "-")


def settings_options(settings_cls: type[BaseSettings], fields: Iterable[str],
                     names: dict[str, str] | None = None, into: str = "overrides") -> Callable:
    """Decorate a typer command: one option per field of ``settings_cls`` in ``fields``
    (``--field-name``; ``names`` maps a field to other option names, e.g. ``{"time": "--time"}``).
    The command receives the options given on the command line as ``into`` (a dict)."""
    fields = list(fields)
    names = names or {}

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != into]
        added = []
        for name in fields:
            info = settings_cls.model_fields[name]
            py_type = _cli_type(info.annotation)
            flag = names.get(name, option_name(name))
            decls = [f"{flag}/--no-{flag[2:]}"] if py_type is bool else [flag]
            option = typer.Option(None, *decls, help=info.description or "", show_default=False)
            added.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                           annotation=Optional[py_type]))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            given = {f: kwargs.pop(f) for f in fields if kwargs.get(f) is not None}
            for f in fields:
                kwargs.pop(f, None)
            return command(**kwargs, **{into: given})

        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + added
        wrapper.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must see this signature, not the command's
        return wrapper

    return decorate
