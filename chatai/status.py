"""``chatai status``: breaker, gateway and tunnel, broker queues, workers and Slurm jobs at once.

Why one view: on an outage the operator's first question is which part is down. Every part is
asked on its own and answers in one line when it cannot be reached, so one dead part never
hides the others (nor prints a traceback or Slurm's DNS SRV errors).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from chatai.discovery import find_stack
from circuit_breaker.breaker import CONFIG_ENV, DEFAULT_CONFIG

def breaker_state(config: Path) -> dict[str, Any]:
    """Tripped or closed, from the breaker's own state files (no broker, no root needed)."""
    if not config.exists():
        return {"config": str(config), "error": f"not configured (no {config})"}
    from circuit_breaker.breaker import Breaker

    try:
        st = Breaker.from_config(config, use_broker=False).status()
    except (OSError, ValueError, KeyError) as exc:
        return {"config": str(config), "error": f"unreadable config {config}: {exc}"}
    return {"config": str(config), "tripped": bool(st.get("tripped")), "since": st.get("since"),
            "reason": st.get("reason"), "by": st.get("by"), "error": None}


def gateway_state(url: str | None) -> dict[str, Any]:
    """The gateway's own view from ``/health``: its broker connection, tunnel and live workers."""
    if not url:
        return {"url": None, "error": "not configured (give --gateway-url or CHATAI_STATUS_GATEWAY_URL)"}
    url = url.rstrip("/").removesuffix("/v1")
    try:
        body = httpx.get(url + "/health", timeout=5).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {"url": url, "error": f"unreachable ({type(exc).__name__}: {exc})"}
    return {"url": url, "error": None, "status": body.get("status"), "broker": body.get("broker"),
            "tunnel": body.get("tunnel"), "models": body.get("models")}


def collect(gateway_url: str | None = None, models: list[str] | None = None, listen: float = 6.0) -> dict[str, Any]:
    """Everything ``chatai status`` shows, as plain data (``--json`` prints it as is)."""
    from slurm_jobs.overview import status_rows
    from slurm_jobs.settings import SlurmSettings

    stack = find_stack()
    out: dict[str, Any] = {"stack": str(stack.path) if stack else None}
    out["breaker"] = breaker_state(Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG))
    out["gateway"] = gateway_state(gateway_url or (stack.gateway_url if stack else None))
    try:
        fleet = status_rows(SlurmSettings(), models or [], listen)
    except ValueError as exc:  # settings that do not validate
        fleet = {"broker": None, "broker_error": f"bad CHATAI_SLURM_* settings: {exc}", "slurm_error": None,
                 "models": [], "jobs": [], "workers": []}
    out.update(fleet)
    return out


def _since(breaker: dict[str, Any]) -> str:
    """The words " since WHEN" when the breaker's state records a date (a fresh one has none)."""
    return f" since {breaker['since']}" if breaker.get("since") else ""


def render(data: dict[str, Any], console: Console | None = None) -> None:
    from slurm_jobs.overview import print_fleet

    console = console or Console()
    console.print(f"stack: {data['stack'] or 'no running chatai dev stack'}")
    b = data["breaker"]
    if b["error"]:
        console.print(f"[yellow]breaker: {b['error']}[/yellow]")
    elif b["tripped"]:
        console.print(f"[red]breaker: TRIPPED{_since(b)}{' by ' + str(b['by']) if b.get('by') else ''}: "
                      f"{b['reason'] or 'no reason given'}[/red]")
    else:
        console.print(f"[green]breaker: closed (service allowed){_since(b)}[/green]")
    g = data["gateway"]
    if g["error"]:
        console.print(f"[yellow]gateway: {g['error']}[/yellow]")
    else:
        broker = g.get("broker") or {}
        tunnel = g.get("tunnel")
        tunnel_text = "direct (no tunnel)" if tunnel is None else \
            f"{tunnel.get('state')}" + (f" ({tunnel['last_error']})" if tunnel.get("last_error") else "")
        conn = "connected" if broker.get("connected") else f"not connected ({broker.get('last_error')})"
        console.print(f"gateway: {g['url']} {g['status']}; broker {conn}; tunnel {tunnel_text}")
    print_fleet(console, data)
