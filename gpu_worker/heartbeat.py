"""Heartbeats: how every gateway learns which models are served, by whom, with what room.

A heartbeat goes to the ``chatai.workers`` fanout every ``interval`` seconds, at once on each
state change (starting, ready, draining, stopped), and shortly after the number of requests in
flight changes (debounced, so a busy worker does not flood the exchange).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Literal

import aio_pika
from aio_pika.abc import AbstractExchange

from broker_config.messages import CONTENT_TYPE, Heartbeat
from broker_config.timing import run_periodically
from gpu_worker.cache_stats import PrefixCacheCount

log = logging.getLogger("chatai.worker.heartbeat")

State = Literal["starting", "ready", "draining", "stopped"]


class Heartbeater:
    def __init__(
        self,
        exchange: AbstractExchange,
        *,
        worker_id: str,
        model: str,
        capacity: int,
        interval: float,
        in_flight: Callable[[], int],
        slurm_job_id: str | None = None,
        max_model_len: int | None = None,
        debounce: float = 0.2,
    ) -> None:
        self._exchange = exchange
        self._in_flight = in_flight
        self.worker_id, self.model, self.capacity, self.interval = worker_id, model, capacity, interval
        self.node = socket.gethostname().split(".")[0]
        self.slurm_job_id = slurm_job_id
        self.max_model_len = max_model_len
        self.job_end_at: float | None = None
        self.adapters: list[str] = []  # known once the engine has started
        self.tasks: list[str] = []
        self.startup_seconds: float | None = None  # process start -> ready, once ready
        self.affinity = False  # consuming its affinity queue
        self.prefix_cache = PrefixCacheCount()  # the engine's, once it has started
        self.state: State = "starting"
        self._debounce = debounce
        self._kick = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._last_sent = 0.0
        self._last_in_flight = -1

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            worker_id=self.worker_id,
            model=self.model,
            state=self.state,
            capacity=self.capacity,
            in_flight=self._in_flight(),
            node=self.node,
            slurm_job_id=self.slurm_job_id,
            max_model_len=self.max_model_len,
            adapters=self.adapters,
            tasks=self.tasks,
            interval=self.interval,
            sent_at=time.time(),
            job_end_at=self.job_end_at,
            startup_seconds=self.startup_seconds,
            affinity=self.affinity,
            prefix_cache_queries=self.prefix_cache.queries,
            prefix_cache_hits=self.prefix_cache.hits,
        )

    async def send(self) -> None:
        hb = self.heartbeat()
        msg = aio_pika.Message(
            hb.encode(),
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
            # A heartbeat is stale after a few intervals: never let it sit in a slow gateway's queue.
            expiration=max(1.0, self.interval * 3),
        )
        try:
            await self._exchange.publish(msg, routing_key="", mandatory=False)
        except Exception as exc:  # the broker may be reconnecting; the next beat will do
            log.warning("heartbeat not sent: %s", type(exc).__name__)
            return
        self._last_sent = time.monotonic()
        self._last_in_flight = hb.in_flight

    async def set_state(self, state: State) -> None:
        if state != self.state:
            log.info("state %s -> %s", self.state, state)
            self.state = state
            await self.send()

    def in_flight_changed(self) -> None:
        """Ask for an early heartbeat (debounced) because the load changed."""
        self._kick.set()

    def start(self) -> None:
        self._task = asyncio.create_task(
            run_periodically(self._beat, self.interval, what="heartbeat", logger=log, wake=self._kick),
            name="heartbeat")

    async def _beat(self) -> None:
        """One beat, at most one per ``debounce`` (a burst of load changes makes one beat), and
        none that would repeat the last one within the interval."""
        await asyncio.sleep(max(0.0, self._debounce - (time.monotonic() - self._last_sent)))
        if time.monotonic() - self._last_sent < self.interval and self._in_flight() == self._last_in_flight:
            return
        await self.send()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def send_stopped(self) -> None:
        """The last word: no more beats, then "stopped" (the gateways drop this worker at once)."""
        await self.stop()
        self.state = "stopped"
        await self.send()
