"""``chatai gateway`` (serve the API) and ``chatai keys`` (manage API keys)."""

from __future__ import annotations

import logging
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from broker_config.connection import check_url
from broker_config.settings_cli import settings_options
from broker_config.terminal import print_rows
from gateway import private
from gateway.keys import KeyStore
from gateway.settings import GatewaySettings

keys_app = typer.Typer(help="API keys of the gateway (stored hashed).", no_args_is_help=True)
StateDir = Annotated[Optional[Path], typer.Option(help="Gateway state directory (env CHATAI_GATEWAY_STATE_DIR).")]
_LIMIT_HELP = "N (0: unlimited) or 'default' (the gateway's CHATAI_GATEWAY_LIMIT_* setting)."
Rpm = Annotated[Optional[str], typer.Option("--rpm", help="Requests per minute: " + _LIMIT_HELP)]
Tpm = Annotated[Optional[str], typer.Option("--tpm", help="Prompt + completion tokens per minute: " + _LIMIT_HELP)]
Concurrent = Annotated[Optional[str], typer.Option("--max-concurrent", help="Requests in flight at once: " + _LIMIT_HELP)]
UploadBytes = Annotated[Optional[str], typer.Option("--upload-bytes", help="Bytes of uploaded files kept: " + _LIMIT_HELP)]
OpenBatches = Annotated[Optional[str], typer.Option("--open-batches", help="Batches not yet finished: " + _LIMIT_HELP)]


def _store(state_dir: Path | None) -> KeyStore:
    # Only the database matters here: no broker or tunnel settings are required.
    if os.environ.get("CHATAI_GATEWAY_DATABASE_URL"):  # replicas' shared database
        return KeyStore(os.environ["CHATAI_GATEWAY_DATABASE_URL"])
    if state_dir is None:
        state_dir = Path(os.environ.get("CHATAI_GATEWAY_STATE_DIR", GatewaySettings.model_fields["state_dir"].default))
    return KeyStore(private.database(state_dir))


def _limits(**given: str | None) -> dict[str, int | None]:
    """The limit options that were given: an integer >= 0, or None for 'default'."""
    out: dict[str, int | None] = {}
    for name, text in given.items():
        if text is None:
            continue
        if text.strip().lower() == "default":
            out[name] = None
        elif text.strip().isdigit():
            out[name] = int(text)
        else:
            raise typer.BadParameter(f"--{name.replace('_', '-')} takes a whole number >= 0 or 'default', not {text!r}")
    return out


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="Who the key is for.")], state_dir: StateDir = None,
                rpm: Rpm = None, tpm: Tpm = None, max_concurrent: Concurrent = None,
                upload_bytes: UploadBytes = None, open_batches: OpenBatches = None) -> None:
    """Create a key and print it once; only its hash is kept. Limits not given follow the gateway's defaults."""
    limits = _limits(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, upload_bytes=upload_bytes,
                     open_batches=open_batches)
    info, key = _store(state_dir).create(name, limits=limits)
    typer.echo(f"{info.id}\t{key}")


@keys_app.command("set-limits")
def keys_set_limits(key_id: str, state_dir: StateDir = None, rpm: Rpm = None, tpm: Tpm = None,
                    max_concurrent: Concurrent = None, upload_bytes: UploadBytes = None,
                    open_batches: OpenBatches = None) -> None:
    """Change an existing key's limits; running gateways apply them to its next request."""
    limits = _limits(rpm=rpm, tpm=tpm, max_concurrent=max_concurrent, upload_bytes=upload_bytes,
                     open_batches=open_batches)
    if not limits:
        raise typer.BadParameter("give at least one of --rpm, --tpm, --max-concurrent, --upload-bytes, --open-batches")
    if not _store(state_dir).set_limits(key_id, limits):
        typer.echo(f"no key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{key_id}\t" + " ".join(f"{k}={'default' if v is None else v}" for k, v in limits.items()))


@keys_app.command("list")
def keys_list(state_dir: StateDir = None) -> None:
    """Keys with their hints and own limits (others follow the CHATAI_GATEWAY_LIMIT_* defaults; 0: unlimited)."""
    fmt = lambda ts: datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M") if ts else ""  # noqa: E731
    rows = []
    for k in _store(state_dir).list():
        own = " ".join(f"{name.replace('_', '-')}={v}" for name, v in k.limits.items() if v is not None)
        rows.append([k.id, k.name, k.hint, fmt(k.created_at), fmt(k.revoked_at), own or "default"])
    print_rows(Console(), ["id", "name", "key", "created", "revoked", "limits"], rows)


@keys_app.command("revoke")
def keys_revoke(key_id: str, state_dir: StateDir = None) -> None:
    if not _store(state_dir).revoke(key_id):
        typer.echo(f"no active key with id {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


Replicas = Annotated[int, typer.Option(
    "--replicas", min=1, help="Gateway processes on this port (uvicorn's workers), each a full gateway; more than "
    "one needs CHATAI_GATEWAY_DATABASE_URL=postgresql://... (docs/deploy.md, 'Several gateway replicas').")]


@settings_options(GatewaySettings, ("host", "port", "state_dir", "broker_direct", "queue_timeout"))
def serve(overrides: dict[str, Any], log_level: str = "info", replicas: Replicas = 1) -> None:
    """Serve the OpenAI-compatible API. Broker credentials come from CHATAI_GATEWAY_BROKER_URL."""
    import uvicorn

    from gateway.app import create_app

    try:
        settings = GatewaySettings(**overrides)
        check_url(settings.broker_url.get_secret_value())  # else the connector would retry it forever
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if replicas == 1:
        uvicorn.run(create_app(settings), log_level=log_level, **uvicorn_options(settings))
        return
    if not settings.database.startswith("postgres"):
        raise typer.BadParameter("--replicas needs a shared PostgreSQL database (CHATAI_GATEWAY_DATABASE_URL): "
                                 "with SQLite each process would count the per-key limits on its own")
    # Each worker process builds its settings from the environment: the flags go there too.
    os.environ.update({f"CHATAI_GATEWAY_{name.upper()}": str(value) for name, value in overrides.items()})
    uvicorn.run("gateway.app:app_from_environment", factory=True, workers=replicas, log_level=log_level,
                **uvicorn_options(settings))


def uvicorn_options(settings: GatewaySettings) -> dict[str, Any]:
    """How uvicorn serves the app. Its access log shows paths and statuses only, never bodies.
    Slow clients: a deadline for each request head (gateway/header_timeout.py), idle keep-alive
    connections closed after ``keep_alive_timeout``, a request head of at most 16 KiB (h11;
    httptools has its own limit)."""
    from gateway.header_timeout import http_protocol

    return dict(host=settings.host, port=settings.port, timeout_graceful_shutdown=10,
                http=http_protocol(settings.header_timeout), timeout_keep_alive=settings.keep_alive_timeout,
                h11_max_incomplete_event_size=16 * 1024)
