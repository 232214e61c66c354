"""What every request handler may need, built once by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, Header, Request

from gateway.cluster.affinity import Affinity, ConversationMemory
from gateway.cluster.broker import GatewayBroker
from gateway.errors import invalid_api_key
from gateway.cluster.generation import Timeouts
from gateway.keys import KeyStore
from gateway.limits import Lease, Limits, RateLimiter
from gateway.shared_limits import SharedRateLimiter
from gateway.cluster.registry import WorkerRegistry
from gateway.schemas import RequestCaps
from gateway.settings import GatewaySettings


@dataclass
class GatewayContext:
    settings: GatewaySettings
    keys: KeyStore
    registry: WorkerRegistry
    broker: GatewayBroker
    tunnel: Any = None  # gateway.cluster.tunnel.BrokerTunnel when the cluster is reached through SSH
    # Per-key counters: this process's (RateLimiter) or the replicas' shared ones (SharedRateLimiter).
    limiter: RateLimiter | SharedRateLimiter = field(default_factory=RateLimiter)
    affinity: Affinity | None = None  # built from the settings when not given

    def __post_init__(self) -> None:
        if self.affinity is None:
            s = self.settings
            self.affinity = Affinity(s.affinity, ConversationMemory(s.affinity_ttl, s.affinity_max_conversations),
                                     self.registry.live, self.registry.heard_at)

    def limits(self, key_id: str) -> Limits:
        """A key's effective limits: its own where set, else the gateway's defaults (read each
        request, so ``chatai keys set-limits`` applies at once)."""
        return self.settings.default_limits.merged(self.keys.limits(key_id))

    def admit(self, key_id: str, cost: int = 1) -> Lease:
        """Count a generation request of an authenticated key (``cost``: its choices); 429
        (RateLimited) over its limits."""
        return self.limiter.admit(key_id, self.limits(key_id), cost)

    def over_rate(self, key_id: str) -> bool:
        """The key has used its requests or tokens of the last minute (its batch lines wait)."""
        return self.limiter.over(key_id, self.limits(key_id))

    def caps(self) -> RequestCaps:
        """What one request may ask now: the served contexts and the per-request budgets."""
        s = self.settings
        return RequestCaps(self.registry.contexts(), fallback_context=s.context_fallback,
                           max_output_tokens=s.max_output_tokens, max_top_logprobs=s.max_top_logprobs,
                           max_logprob_tokens=s.max_logprob_tokens, min_json_values=s.min_json_values)

    @property
    def timeouts(self) -> Timeouts:
        return Timeouts(queue=self.settings.queue_timeout, idle=self.settings.stream_idle_timeout)


async def get_context(request: Request) -> GatewayContext:
    """Async on purpose: FastAPI runs a plain ``def`` dependency in a worker thread, a thread hop
    (and GIL hand-over) on every request for what is an attribute lookup."""
    return request.app.state.ctx


async def require_api_key(
    request: Request,
    ctx: GatewayContext = Depends(get_context),
    authorization: str | None = Header(default=None),
) -> str:
    """The caller's key id; 401 for a missing, malformed, unknown or revoked key.

    The request guard (gateway/http_guard.py) already verified the key of every ``/v1`` request
    before its body was read and left the id in the request's state: one lookup per request.
    """
    key_id = request.scope.get("state", {}).get("api_key_id")
    if key_id is not None:
        return key_id
    if not authorization or not authorization.lower().startswith("bearer "):
        raise invalid_api_key()
    key_id = ctx.keys.verify(authorization[7:].strip())
    if key_id is None:
        raise invalid_api_key()
    return key_id
