"""``chatai breaker``: status, trip, reset, watch and install (run as root on the login node).

Without ``--config`` or ``CHATAI_BREAKER_CONFIG``, a running ``chatai dev`` stack's breaker is
used (see :mod:`chatai.discovery`), else the installed ``/etc/chatai-breaker/config.json``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from broker_config.admin import BrokerAdminError
from circuit_breaker.breaker import CONFIG_ENV, DEFAULT_CONFIG

app = typer.Typer(help="The SSH circuit breaker in front of the cluster.", no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", envvar=CONFIG_ENV,
                                         help="Breaker config written by the installer.")]
NodeOpt = Annotated[str | None, typer.Option("--rabbit-node", help="RabbitMQ node (rabbitmqctl -n); "
                                             "default: the installed config's.")]
NoBrokerOpt = Annotated[bool, typer.Option("--no-broker", help="Leave the broker alone (sshd side only).")]


def _breaker(config: Path, node: str | None, no_broker: bool):
    from circuit_breaker.breaker import Breaker

    if not config.exists():
        typer.echo(f"breaker: not configured (no {config}; run `chatai breaker install` on the login node, "
                   "or start `chatai dev`, which these commands find by themselves)", err=True)
        raise typer.Exit(2)
    try:
        return Breaker.from_config(config, rabbit_node=node, use_broker=not no_broker)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot read breaker config {config}: {exc}") from exc


@app.command()
def status(config: ConfigOpt = DEFAULT_CONFIG, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Tripped or not, since when, why, and the last recorded attempts. Exit 1 when tripped."""
    st = _breaker(config, None, True).status()
    if as_json:
        typer.echo(json.dumps(st, indent=2))
    else:
        typer.echo(f"{'TRIPPED' if st['tripped'] else 'closed (service allowed)'}"
                   f"  since {st.get('since')}  reason: {st.get('reason')}  by: {st.get('by')}")
        for a in st["attempts"]:
            typer.echo(f"  attempt {a.get('time')} {a.get('client')} {a.get('kind')} {a.get('command')}")
    raise typer.Exit(1 if st["tripped"] else 0)


@app.command()
def trip(config: ConfigOpt = DEFAULT_CONFIG, reason: str = "tripped by an operator", node: NodeOpt = None,
         no_broker: NoBrokerOpt = False) -> None:
    """Refuse tunnel logins, end tunnel sessions, shut the gateway's broker user out."""
    try:
        st = _breaker(config, node, no_broker).trip(reason=reason, by=os.environ.get("SUDO_USER") or "operator")
    except BrokerAdminError as exc:
        typer.echo(f"breaker tripped on the SSH side, but the broker side failed: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"tripped at {st['since']}")


@app.command()
def reset(config: ConfigOpt = DEFAULT_CONFIG, node: NodeOpt = None, no_broker: NoBrokerOpt = False) -> None:
    """Restore the gateway's broker permissions and tunnel logins; nothing is restarted."""
    try:
        st = _breaker(config, node, no_broker).reset(by=os.environ.get("SUDO_USER") or "operator")
    except BrokerAdminError as exc:
        typer.echo(f"broker side failed, breaker left tripped: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(f"reset at {st['since']}")


@app.command()
def watch(config: ConfigOpt = DEFAULT_CONFIG, node: NodeOpt = None,
          interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
          reapply: Annotated[float, typer.Option(help="Re-apply the broker side this often (s).")] = 30.0) -> None:
    """Daemon for automatic trips: absorb trip requests and enforce the broker side."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _breaker(config, node, False).watch(interval=interval, reapply=reapply)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                               "help_option_names": []})
def install(ctx: typer.Context) -> None:
    """Create the tunnel account, the hook, the key file, the sshd snippet (validated with sshd -t)
    and the watcher's systemd unit (enabled and started where systemd runs). The options are
    install.sh's, declared once in circuit_breaker/install.py: see `chatai breaker install --help`."""
    from circuit_breaker.install import main

    raise typer.Exit(main(ctx.args, prog="chatai breaker install"))
