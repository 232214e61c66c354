"""The life of one interactive request on the broker, as the gateway sees it.

Publish, wait for a worker to start it (at most the queue timeout), then pass its frames on
in order. The rules of the wire protocol live here: frames of an older attempt are dropped,
a duplicate sequence number is dropped, and a redelivery (a worker died) either restarts the
request transparently or, when part of a streamed response was already relayed to the client,
ends it with an error, because tokens cannot be unsent.

It speaks to the broker only through ``BrokerPort`` and fails with ``gateway.cluster.errors``
(the API maps them to HTTP in ``gateway/errors.py``), so these rules are unit-tested in memory.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from broker_config import topology as t
from broker_config.messages import ApiRequest, Data, Error, Final, Head, Started
from gateway.cluster.broker_port import CONNECTION_LOST, BrokerPort
from gateway.cluster.errors import (
    ClusterError,
    ClusterUnavailable,
    NoWorkerAvailable,
    WorkerFailed,
    WorkerLost,
    WorkerTimeout,
)
from gateway.metrics import CANCELLATIONS, IN_FLIGHT, QUEUE_WAIT, TIME_TO_FIRST_TOKEN, TOKENS, model_label


def new_request_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Timeouts:
    queue: float  # for a worker to start the request (and to restart it after a redelivery)
    idle: float  # for the next frame of a started request
    liveness: float = 1.0  # between checks that the broker and the request's worker are still there
    cold_start: bool = False  # ``queue`` is a cold model's wait for a worker to start (gateway/cluster/cold_start.py)


@dataclass
class Outcome:
    """What the caller needs once the stream ends."""

    final: Final | None = None
    streamed_tokens: int = 0  # output tokens of the Data frames relayed so far
    relayed: bool = False  # part of a streamed response has gone to the client
    worker_id: str | None = None
    attempts: list[int] = field(default_factory=list)


class Generation:
    """Iterate over a request's frames; raises ClusterError on failures the client must see."""

    def __init__(self, broker: BrokerPort, request: ApiRequest, timeouts: Timeouts, *, prefer: str | None = None,
                 on_started: Callable[[str], None] | None = None,
                 on_final: Callable[[str], None] | None = None) -> None:
        self.broker = broker
        self.request = request
        self.timeouts = timeouts
        self.prefer = prefer  # a worker that may hold the conversation's prefix cache (affinity)
        self._on_started = on_started  # told the worker of the first start (affinity remembers it)
        self._on_final = on_final  # told the worker that answered (a slot there is free again)
        self.outcome = Outcome()
        self.published = False  # the broker confirmed the request: no 404 or 429 can follow
        self._done = False

    @classmethod
    def build(cls, broker: BrokerPort, timeouts: Timeouts, *, prefer: str | None = None,
              on_started: Callable[[str], None] | None = None, on_final: Callable[[str], None] | None = None,
              **fields: object) -> "Generation":
        request = ApiRequest(request_id=new_request_id(), reply_to=broker.reply_queue_name,
                                  deadline=time.time() + timeouts.queue, **fields)
        return cls(broker, request, timeouts, prefer=prefer, on_started=on_started, on_final=on_final)

    async def frames(self) -> AsyncIterator[Started | Head | Data | Final]:
        req = self.request
        sub = self.broker.subscribe(req.request_id)
        label = model_label(req.model)  # fixed for the request: inc and dec hit the same series
        IN_FLIGHT.labels(label).inc()
        published = time.monotonic()
        try:
            try:
                await self.broker.publish_request(req, priority=t.INTERACTIVE_PRIORITY, ttl=self.timeouts.queue,
                                                  prefer=self.prefer)
            except ClusterError:
                self._done = True  # nothing was queued: nothing to cancel
                raise
            self.published = True
            attempt, last_seq, started_at = 0, -1, None
            first_token_seen = False
            while True:
                frame = await self._next(sub.frames, attempt, started_at is None)
                if frame.attempt < attempt or (frame.attempt == attempt and frame.seq <= last_seq):
                    continue  # an older attempt's or a duplicate frame
                if isinstance(frame, Started):
                    if attempt and self.outcome.relayed:
                        raise WorkerLost()
                    attempt, last_seq = frame.attempt, frame.seq
                    self.outcome.attempts.append(frame.attempt)
                    self.outcome.worker_id = frame.worker_id
                    if started_at is None:
                        started_at = time.monotonic()
                        QUEUE_WAIT.labels(label).observe(started_at - published)
                        if self._on_started is not None:
                            self._on_started(frame.worker_id)
                    yield frame
                    continue
                if frame.attempt > attempt:
                    continue  # frames of a newer attempt before its Started: wait for it
                last_seq = frame.seq
                if isinstance(frame, Error):
                    raise WorkerFailed(frame.status, frame.code, frame.message)
                if isinstance(frame, Data):
                    if not first_token_seen:
                        first_token_seen = True
                        TIME_TO_FIRST_TOKEN.labels(label).observe(time.monotonic() - published)
                    self.outcome.streamed_tokens += frame.tokens
                    self.outcome.relayed = True
                    yield frame
                    continue
                if isinstance(frame, Head):
                    self.outcome.relayed = True
                    yield frame
                    continue
                assert isinstance(frame, Final)
                self.outcome.final = frame
                if self._on_final is not None and self.outcome.worker_id is not None:
                    self._on_final(self.outcome.worker_id)
                TOKENS.labels(label, "prompt").inc(frame.usage.prompt_tokens)
                TOKENS.labels(label, "completion").inc(frame.usage.completion_tokens)
                self._done = True
                yield frame
                return
        finally:
            sub.close()
            IN_FLIGHT.labels(label).dec()
            if not self._done:
                # The client left, or we gave up: free the worker (or the queued message).
                CANCELLATIONS.labels(label).inc()
                task = asyncio.create_task(self.broker.cancel(req.request_id, "client gone"))
                _background.add(task)
                task.add_done_callback(_background.discard)

    async def _next(self, frames: asyncio.Queue, attempt: int, waiting_for_start: bool):
        """The next frame; NoWorkerAvailable / WorkerTimeout when the queue timeout or the worker's
        silence runs out, ClusterUnavailable when the broker connection is gone."""
        if not frames.empty():  # the common case mid-stream: no timer, no task
            return self._checked(frames.get_nowait())
        limit = self.timeouts.queue if waiting_for_start else self.timeouts.idle
        deadline = time.monotonic() + limit
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                if waiting_for_start:
                    raise NoWorkerAvailable(self.request.model, self.timeouts.queue, self.timeouts.cold_start)
                raise WorkerTimeout()
            try:
                return self._checked(await asyncio.wait_for(frames.get(),
                                                            timeout=min(remaining, self.timeouts.liveness)))
            except asyncio.TimeoutError:
                pass
            if not self.broker.connected:
                raise ClusterUnavailable()
            worker = self.outcome.worker_id
            if not waiting_for_start and worker and not self.broker.worker_alive(worker):
                # Its worker is gone: the broker redelivers the request; give that the queue timeout.
                waiting_for_start = True
                deadline = time.monotonic() + self.timeouts.queue
                self.outcome.worker_id = None

    @staticmethod
    def _checked(frame: object):
        if frame is CONNECTION_LOST:
            raise ClusterUnavailable()
        return frame


_background: set[asyncio.Task] = set()
