"""``chatai worker``: flags override ``CHATAI_WORKER_*`` variables; both come from
:class:`gpu_worker.settings.WorkerSettings`, one option per field.

The broker URL holds the worker user's password; give it as CHATAI_WORKER_BROKER_URL (argv is
world-readable in ``ps``). ``--broker-url`` exists for local experiments only.
"""

from __future__ import annotations

from typing import Any

import typer

from broker_config.connection import check_url
from broker_config.settings_cli import settings_options
from gpu_worker.settings import WorkerSettings


@settings_options(WorkerSettings, WorkerSettings.model_fields)
def worker(overrides: dict[str, Any]) -> None:
    """Serve one model from its RabbitMQ queue with vLLM until stopped, drained or idle."""
    from gpu_worker.main import main

    settings = WorkerSettings(**overrides)
    try:
        check_url(settings.broker_url.get_secret_value())
    except ValueError as exc:
        raise typer.BadParameter(f"{exc} (from CHATAI_WORKER_BROKER_URL or --broker-url)",
                                 param_hint="--broker-url") from None
    if settings.model is None and settings.engine == "vllm":
        raise typer.BadParameter("give --model PATH or CHATAI_WORKER_MODEL", param_hint="--model")
    main(settings)  # ends the process with the worker's exit code


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)


def standalone() -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(worker)
    app()
