"""``GET /api/status``: what the status page shows, for holders of an API key or the metrics token.

Models, live workers (from heartbeats) and their capacity, queue depths (a passive declare on
the gateway's own broker connection: nothing is created and no permission is needed), the
tunnel and the broker connection, and what the gateway can tell of the circuit breaker (it
cannot read the breaker's state on the login node; it sees only its effects). Internals stay
behind a key, as ``/metrics`` does behind its token (docs/security.md); where workers run
(worker id, node, Slurm job) only behind the metrics token; the gateway id, which names its
reply queue, is not shown.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from broker_config.connection import QueueDepth
from broker_config.heartbeats import PrefixCacheFigures
from gateway.cluster.cold_start import listed_models, view
from gateway.context import GatewayContext, get_context
from gateway.errors import invalid_api_key
from gateway.http_guard import bearer_token, token_matches

router = APIRouter(include_in_schema=False)
QUEUE_CACHE_SECONDS = 1.0  # many open status pages cost one passive declare per model per second


async def status_access(request: Request, ctx: GatewayContext = Depends(get_context)) -> bool:
    """An API key, or the metrics token where one is set; 401 otherwise. True for the operator
    (the metrics token): only they see where workers run."""
    token = ctx.settings.metrics_token
    if token is not None and token_matches(request.headers, token.get_secret_value()):
        return True
    given = bearer_token(request.headers)
    if given is None or ctx.keys.verify(given) is None:
        raise invalid_api_key()
    return False


# What only the operator sees of a worker: where it runs (its id is node-job-pid).
OPERATOR_ONLY = ("worker_id", "node", "slurm_job_id")


class _QueueCache:
    def __init__(self) -> None:
        self.at = 0.0
        self.depths: dict[str, QueueDepth | None] = {}
        self.lock = asyncio.Lock()

    async def get(self, ctx: GatewayContext, models: list[str]) -> dict[str, QueueDepth | None]:
        async with self.lock:
            if time.monotonic() - self.at > QUEUE_CACHE_SECONDS or set(models) - set(self.depths):
                self.depths = {m: await ctx.broker.queue_depth(m) for m in models}
                self.at = time.monotonic()
            return self.depths


_queues = _QueueCache()


def breaker_view(ctx: GatewayContext) -> dict[str, str]:
    """The breaker as the gateway sees it: its effects on the tunnel and on the broker login."""
    tunnel = ctx.tunnel
    if tunnel is None:
        return {"state": "not in the path", "detail": "the gateway connects to the broker directly (no tunnel)"}
    if tunnel.state == "up" and ctx.broker.connected:
        return {"state": "closed", "detail": "the login node accepts the tunnel and the broker the gateway's user"}
    error = (tunnel.last_error or "") + " " + (ctx.broker.last_error or "")
    if "permission denied" in error.lower() or "ACCESS_REFUSED" in error:
        return {"state": "probably tripped", "detail": error.strip()}
    return {"state": "unknown", "detail": error.strip() or f"tunnel {tunnel.state}"}


@router.get("/api/status")
async def status(ctx: GatewayContext = Depends(get_context), operator: bool = Depends(status_access)) -> dict:
    now = time.time()
    by_model = ctx.registry.models()
    names = listed_models(ctx.registry, ctx.settings.models)  # cold ones too (gateway/cluster/cold_start.py)
    depths = await _queues.get(ctx, names)
    models = []
    for name in names:
        hbs = by_model.get(name, [])
        depth = depths.get(name)
        models.append({
            "name": name,
            **view(ctx.registry, name).fields(),
            "workers": {s: sum(1 for h in hbs if h.state == s) for s in ("starting", "ready", "draining")},
            "capacity": sum(h.capacity for h in hbs),
            "in_flight": sum(h.in_flight for h in hbs),
            "prefix_cache_hit_rate": PrefixCacheFigures.of(hbs).hit_rate,
            "queue": None if depth is None else {"waiting": depth.messages, "consumers": depth.consumers},
        })
    workers = [{
        "worker_id": h.worker_id, "model": h.model, "state": h.state, "node": h.node,
        "slurm_job_id": h.slurm_job_id, "capacity": h.capacity, "in_flight": h.in_flight,
        "heartbeat_age": round(max(0.0, now - h.sent_at), 1),
        "job_ends_in": None if h.job_end_at is None else round(h.job_end_at - now),
    } for h in sorted(ctx.registry.live(), key=lambda h: (h.model, h.worker_id))]
    if not operator:
        workers = [{k: v for k, v in w.items() if k not in OPERATOR_ONLY} for w in workers]
    tunnel = None if ctx.tunnel is None else {"state": ctx.tunnel.state, "last_error": ctx.tunnel.last_error}
    return {
        "time": now,
        "broker": {"connected": ctx.broker.connected, "last_error": ctx.broker.last_error},
        "tunnel": tunnel,
        "breaker": breaker_view(ctx),
        "models": models,
        "workers": workers,
    }
