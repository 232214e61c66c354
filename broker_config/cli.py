"""``chatai broker``: render and apply the broker's definitions (run on the broker's host)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from broker_config.admin import BrokerAdmin, BrokerAdminError
from broker_config.definitions import ROLES, Definitions, new_password

app = typer.Typer(help="Broker topology, users and permissions.", no_args_is_help=True)

ModelsOpt = Annotated[list[str], typer.Option("--model", "-m", help="Served model name; repeat for each model.")]
SecretsOpt = Annotated[
    Path,
    typer.Option(help="JSON file with a password per broker user; created with fresh passwords if missing."),
]


def load_or_create_passwords(path: Path) -> dict[str, str]:
    """Passwords for the broker users, kept in a file only its owner can read."""
    if path.exists():
        passwords = json.loads(path.read_text())
    else:
        passwords = {}
    missing = [r for r in ROLES if r not in passwords]
    if missing:
        passwords.update({r: new_password() for r in missing})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600, exist_ok=True)
        path.chmod(0o600)
        path.write_text(json.dumps(passwords, indent=2))
    return passwords


@app.command()
def render(
    model: ModelsOpt,
    secrets: SecretsOpt = Path("broker-secrets.json"),
    max_queue_length: int = 10_000,
) -> None:
    """Print the definitions document (JSON) for these models."""
    doc = Definitions(models=model, passwords=load_or_create_passwords(secrets), max_queue_length=max_queue_length)
    typer.echo(doc.to_json())


@app.command()
def apply(
    model: ModelsOpt,
    secrets: SecretsOpt = Path("broker-secrets.json"),
    node: Annotated[str | None, typer.Option(help="RabbitMQ node name, e.g. rabbit@broker.")] = None,
    max_queue_length: int = 10_000,
) -> None:
    """Import the definitions into a running broker with rabbitmqctl (idempotent)."""
    doc = Definitions(models=model, passwords=load_or_create_passwords(secrets), max_queue_length=max_queue_length)
    try:
        BrokerAdmin(node=node).import_definitions(doc.render())
    except BrokerAdminError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(f"applied definitions for {len(model)} model(s): {', '.join(model)}")
