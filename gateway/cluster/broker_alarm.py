"""Broker resource alarms (memory, disk) as the gateway's AMQP connection learns of them.

When a RabbitMQ node runs low on memory or disk it stops reading from every connection that
publishes, and tells each one so with ``connection.blocked`` (reason ``"low on disk"`` or
``"low on memory"``) the first time it publishes during the alarm; ``connection.unblocked``
follows when every alarm has cleared. A blocked publish never gets its confirm, so without
this module a request waited for the publish timeout and was then blamed on the tunnel.

Here the first publish that runs into an alarm is given up the moment ``connection.blocked``
arrives (a few milliseconds), later ones are refused without publishing, and all answer 503
``cluster_overloaded`` (``ClusterOverloaded``); the batch feeder treats it like a full queue (its lines wait).
The state belongs to one AMQP connection: a new connection starts unblocked.

aiormq (7.x) handles both frames itself and offers no callback, so ``watch`` wraps its two
handlers on the connection instance; without them (another aiormq) the gateway falls back to
the publish timeout and logs that once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from broker_config.timing import first_of
from gateway.cluster.errors import ClusterOverloaded

log = logging.getLogger("chatai.gateway.cluster.broker")
T = TypeVar("T")

_HANDLERS = ("_Connection__handle_connection_blocked", "_Connection__handle_connection_unblocked")


def cluster_overloaded(reason: str | None) -> ClusterOverloaded:
    return ClusterOverloaded(
        f"The cluster is overloaded: its message broker has stopped accepting requests "
        f"({reason or 'resource alarm'}). Nothing is wrong with your request; try again later."
    )


def alarm_kind(reason: str | None) -> str | None:
    """``"disk"``, ``"memory"`` or ``"other"`` from the broker's reason text; None when unblocked."""
    if reason is None:
        return None
    for kind in ("disk", "memory"):
        if kind in reason.lower():
            return kind
    return "other"


class BlockedTracker:
    """Whether the broker blocks this gateway's publishing connection, and why."""

    def __init__(self) -> None:
        self.reason: str | None = None  # the broker's text, e.g. "low on disk"
        self.since: float | None = None  # wall-clock time the block began
        self._blocked: asyncio.Future | None = None  # resolved when the next block begins

    @property
    def blocked(self) -> bool:
        return self.reason is not None

    def status(self) -> dict[str, Any] | None:
        """For ``/health``: which alarm, since when; None when publishing is not blocked."""
        if self.reason is None:
            return None
        return {"alarm": alarm_kind(self.reason), "reason": self.reason, "since": self.since}

    def watch(self, connection: Any) -> None:
        """Follow ``connection.blocked`` / ``unblocked`` on an aio-pika connection's current
        AMQP connection (call again after every reconnect: each has its own)."""
        self._set(None)
        raw = getattr(getattr(connection, "transport", None), "connection", None)
        if raw is None or not all(hasattr(raw, name) for name in _HANDLERS):
            log.warning("cannot follow broker resource alarms with this aiormq; a blocked publish "
                        "will end with the publish timeout")
            return
        on_blocked, on_unblocked = (getattr(raw, name) for name in _HANDLERS)

        async def blocked(frame: Any) -> None:
            self._set(str(getattr(frame, "reason", "") or "resource alarm"))
            await on_blocked(frame)

        async def unblocked(frame: Any) -> None:
            self._set(None)
            await on_unblocked(frame)

        setattr(raw, _HANDLERS[0], blocked)
        setattr(raw, _HANDLERS[1], unblocked)

    def connection_lost(self) -> None:
        self._set(None)

    def _set(self, reason: str | None) -> None:
        if reason == self.reason:
            return
        self.reason = reason
        self.since = time.time() if reason is not None else None
        if reason is not None:
            log.warning("the broker blocks publishing (%s): answering 503 cluster_overloaded", reason)
            if self._blocked is not None and not self._blocked.done():
                self._blocked.set_result(reason)
            self._blocked = None
        else:
            log.info("the broker accepts publishing again")

    async def guard(self, publish: Awaitable[T]) -> T:
        """Await a publish, but give it up with 503 ``cluster_overloaded`` as soon as the
        broker blocks the connection (or at once, while it is blocked)."""
        if self.reason is not None:
            if asyncio.iscoroutine(publish):
                publish.close()
            raise cluster_overloaded(self.reason)
        if self._blocked is None:
            self._blocked = asyncio.get_running_loop().create_future()
        block = self._blocked
        task = asyncio.ensure_future(publish)
        # Shielded: the alarm's future is shared by every publish waiting now.
        if task in await first_of(task, asyncio.shield(block)):
            return task.result()
        # The message may reach a queue once the alarm clears: an interactive one expires
        # (its TTL, its deadline), a batch line is sent again and its duplicate result dropped.
        raise cluster_overloaded(self.reason or block.result())
