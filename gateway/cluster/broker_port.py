"""What a request's life on the cluster needs from the broker, and nothing more.

``Generation`` (``gateway/cluster/generation.py``) depends on this small interface instead of the AMQP
adapter, so the protocol rules it enforces (attempts, sequence numbers, a lost worker) are
tested in memory (``tests/test_generation_units.py``) as well as end to end against the real
broker. ``gateway.cluster.broker.GatewayBroker`` is the one production implementation.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from broker_config.messages import ApiRequest


CONNECTION_LOST = object()  # put in a subscription's frames when the broker connection drops


class Subscription:
    """The frames of one request, in arrival order (``CONNECTION_LOST`` once the connection that
    carried them is gone: frames sent meanwhile are lost with the exclusive reply queue)."""

    def __init__(self, request_id: str, on_close: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.frames: asyncio.Queue = asyncio.Queue()
        self._on_close = on_close

    def connection_lost(self) -> None:
        self.frames.put_nowait(CONNECTION_LOST)

    def close(self) -> None:
        self._on_close(self.request_id)


class BrokerPort(Protocol):
    """Publish a request, receive its frames, cancel it, and know whether a worker lives.

    ``publish_request`` raises ``gateway.cluster.errors`` (ModelNotFound, QueueFull,
    ClusterUnavailable, ...) when nothing was queued. ``prefer`` names a worker to offer the
    request to first (prefix-cache affinity); it spills to the model's queue if that worker cannot
    take it within the spill bound, and goes there at once if the worker has no affinity queue.
    """

    reply_queue_name: str

    @property
    def connected(self) -> bool: ...

    def subscribe(self, request_id: str) -> Subscription: ...

    async def publish_request(self, request: ApiRequest, *, priority: int, ttl: float | None,
                              persistent: bool = False, prefer: str | None = None) -> None: ...

    async def cancel(self, request_id: str, reason: str) -> None: ...

    def worker_alive(self, worker_id: str) -> bool: ...
