"""``chatai broker``: render and apply the broker's definitions (run on the broker's host)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker_config import topology as t
from broker_config.admin import BrokerAdmin, BrokerAdminError
from broker_config.definitions import DEFAULT_GATEWAY, ROLES, Definitions, load_or_create_passwords
from broker_config.provision import Limits
from broker_config.provision import apply as apply_to_broker

app = typer.Typer(help="Broker topology, users and permissions.", no_args_is_help=True)

ModelsOpt = Annotated[list[str], typer.Option("--model", "-m", help="Served model name; repeat for each model.")]
GatewaysOpt = Annotated[
    list[str],
    typer.Option("--gateway", "-g", help="Gateway deployment name = its broker user, which owns only "
                 "chatai.gw.<name>.* queues and routing keys; repeat for each deployment."),
]
SecretsOpt = Annotated[
    Path,
    typer.Option(help="JSON file with a password per broker user; created with fresh passwords if missing."),
]


def _definitions(model: list[str], gateway: list[str] | None, secrets: Path, max_queue_length: int) -> Definitions:
    gateways = gateway or [DEFAULT_GATEWAY]
    try:
        doc = Definitions(models=model, gateways=gateways, max_queue_length=max_queue_length,
                          passwords=load_or_create_passwords(secrets, [*gateways, *ROLES]))
        doc.render()  # validates the deployment names
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    return doc


@app.command()
def render(
    model: ModelsOpt,
    gateway: GatewaysOpt = [],  # noqa: B006 - typer needs a list default
    secrets: SecretsOpt = Path("broker-secrets.json"),
    max_queue_length: int = t.DEFAULT_MAX_QUEUE_LENGTH,
) -> None:
    """Print the definitions document (JSON) for these models and gateway deployments."""
    typer.echo(_definitions(model, gateway, secrets, max_queue_length).to_json())


@app.command()
def apply(
    model: ModelsOpt,
    gateway: GatewaysOpt = [],  # noqa: B006
    secrets: SecretsOpt = Path("broker-secrets.json"),
    node: Annotated[str | None, typer.Option(help="RabbitMQ node name, e.g. rabbit@broker.")] = None,
    max_queue_length: int = t.DEFAULT_MAX_QUEUE_LENGTH,
    max_connections: Annotated[int, typer.Option(help="vhost limit: AMQP connections, all users.")] = 1000,
    max_queues: Annotated[int, typer.Option(help="vhost limit: queues, all users.")] = 2000,
    gateway_max_connections: Annotated[int, typer.Option(help="per gateway deployment: connections.")] = 16,
    gateway_max_channels: Annotated[int, typer.Option(help="per gateway deployment: channels.")] = 64,
) -> None:
    """Import the definitions, delete the guest user, set vhost and gateway limits (idempotent)."""
    doc = _definitions(model, gateway, secrets, max_queue_length)
    limits = Limits(max_connections=max_connections, max_queues=max_queues,
                    gateway_max_connections=gateway_max_connections, gateway_max_channels=gateway_max_channels)
    try:
        done = apply_to_broker(BrokerAdmin(node=node), doc, limits)
    except BrokerAdminError as exc:
        raise typer.BadParameter(str(exc)) from exc
    for line in done:
        typer.echo(line)
    typer.echo(f"applied definitions for {len(model)} model(s): {', '.join(model)}")
