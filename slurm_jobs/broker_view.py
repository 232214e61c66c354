"""What the broker knows about each model, seen through the read-only ``operator`` user.

Why through AMQP and not rabbitmqctl: the operator tools may run on any login or service node
with just the operator's password; they need neither the Erlang cookie nor admin rights.
Queue depth and consumer count come from a passive ``queue.declare`` (no permission needed,
nothing is created); live workers come from heartbeats, copied into a private exclusive queue
bound to the workers fanout exchange.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from broker_config import topology as t
from broker_config.connection import connect, queue_depth
from broker_config.heartbeats import HeartbeatBook
from broker_config.messages import SCALER_MESSAGE_TYPE, Heartbeat
from broker_config.timing import pause


@dataclass(frozen=True)
class QueueStats:
    model: str
    ready: int | None  # messages waiting; None: the model has no queue on the broker
    consumers: int | None


class BrokerView:
    """One operator connection: queue stats on demand, heartbeats collected in the background."""

    def __init__(self, url: str, name: str = "chatai-operator") -> None:
        self.url = url
        self.name = name
        self.book = HeartbeatBook()
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None
        self._hb_channel: aio_pika.abc.AbstractChannel | None = None
        self._heartbeat_arrived = asyncio.Event()

    async def __aenter__(self) -> "BrokerView":
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self, heartbeats: bool = True) -> None:
        self._conn = await connect(self.url, self.name)
        if heartbeats:
            self._hb_channel = await self._conn.channel()
            queue = await self._hb_channel.declare_queue(
                t.operator_workers_queue(uuid.uuid4().hex[:12]), exclusive=True, auto_delete=True,
                arguments={"x-message-ttl": 30_000},
            )
            await queue.bind(t.WORKERS_EXCHANGE)
            await queue.consume(self._on_heartbeat, no_ack=True)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None

    async def _on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        if message.type == SCALER_MESSAGE_TYPE:  # an autoscaler's own heartbeat, not a worker's
            return
        try:
            hb = Heartbeat.model_validate_json(message.body)
        except ValueError:
            return
        self.book.add(hb)
        self._heartbeat_arrived.set()

    async def wait_for_heartbeats(self, timeout: float, jobs: set[str] | None = None) -> bool:
        """Wait up to ``timeout`` for a first heartbeat; given ``jobs`` (Slurm job ids of running
        workers), until each of them has been heard. Workers beat once per interval, not together:
        stopping soon after the first one heard missed the others."""
        def heard() -> bool:
            if not self._heartbeat_arrived.is_set():
                return False
            return not jobs or jobs <= {hb.slurm_job_id for hb in self.book.live() if hb.slurm_job_id}

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not heard():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._heartbeat_arrived.clear()  # set again by the next heartbeat
            await pause(left, self._heartbeat_arrived)
        return True

    @property
    def connection(self) -> aio_pika.abc.AbstractRobustConnection:
        assert self._conn is not None, "open() first"
        return self._conn

    async def queue_stats(self, model: str) -> QueueStats:
        """Depth and consumers of a model queue (passive declare)."""
        assert self._conn is not None, "open() first"
        depth = await queue_depth(self._conn, t.model_queue(model))
        return QueueStats(model, None, None) if depth is None else QueueStats(model, depth.messages, depth.consumers)
