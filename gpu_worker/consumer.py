"""Pulling work: the model queue with prefetch = capacity, and the control queue for cancels.

An idle worker has free prefetch slots, so the broker hands it requests; a full one has none,
so requests wait in the queue for whichever worker frees up first. Beside the model's shared
queue a worker consumes its own affinity queue (follow-up turns of conversations it served,
whose prefix it may still hold in cache); one channel-wide prefetch covers both, so the two
together never hold more than the engine's capacity, and what waits in the affinity queue while
the worker is full spills to the shared queue after the spill bound (the broker's policy). Each delivery becomes a
task; its message is acknowledged only after the final (or error) frame is confirmed by the
broker, so a worker that dies mid-request loses nothing: the broker redelivers the message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
from pydantic import ValidationError

from broker_config import topology
from broker_config.messages import ApiRequest, Cancel
from gpu_worker.engine import ApiEngine, EngineDead
from gpu_worker.replies import ReplyPublisher, ReplyStream
from gpu_worker.settings import WorkerSettings

log = logging.getLogger("chatai.worker.consumer")

CANCEL_TIMEOUT = 3.0  # seconds for basic.cancel, which a broker answers in milliseconds


class Delivery:
    """The message that brought one request: settled once (acked, or rejected with requeue) and
    never again, and lost when its channel has closed (the broker then redelivers it by itself,
    so this attempt sends nothing more)."""

    def __init__(self, message: AbstractIncomingMessage, request_id: str) -> None:
        self.message = message
        self._request_id = request_id
        self.settled = False

    @property
    def lost(self) -> bool:
        try:
            self.message.channel
        except Exception:
            return True
        return False

    async def ack(self) -> None:
        await self._settle(requeue=False)

    async def requeue(self) -> None:
        await self._settle(requeue=True)

    async def _settle(self, requeue: bool) -> None:
        """If the channel is gone the broker redelivers by itself, so a failure here is only
        logged: never turn it into an error frame for the client."""
        if self.settled:
            return
        self.settled = True
        try:
            if requeue:
                await self.message.reject(requeue=True)
            else:
                await self.message.ack()
        except Exception as exc:
            log.warning("request_id=%s: could not %s (%s); the broker will redeliver it",
                        self._request_id, "requeue" if requeue else "ack", type(exc).__name__)


class GiveBack(Exception):
    """This attempt ends unanswered and its message goes back to the queue (drain ran out of time)."""


class DeliveryLost(Exception):
    """The message's channel closed mid-request; the broker will redeliver it."""


@dataclass
class Job:
    delivery: Delivery
    request: ApiRequest
    attempt: int
    task: asyncio.Task | None = None
    cancelled: bool = False  # a Cancel arrived: the final frame says "aborted"
    requeue: bool = False  # draining ran out of time: give the message back, send nothing more
    aborted: bool = False
    received_at: float = field(default_factory=time.monotonic)


class RecentlyCancelled:
    """Request ids cancelled lately, so a cancel that overtakes its request still counts."""

    def __init__(self, ttl: float, max_items: int = 100_000) -> None:
        self._ttl, self._max = ttl, max_items
        self._ids: OrderedDict[str, float] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._prune()
        self._ids[request_id] = time.monotonic() + self._ttl
        self._ids.move_to_end(request_id)
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: str) -> bool:
        self._prune()
        return request_id in self._ids

    def _prune(self) -> None:
        now = time.monotonic()
        while self._ids:
            first = next(iter(self._ids))
            if self._ids[first] > now:
                break
            del self._ids[first]


def cancel_key(message: AbstractIncomingMessage, request_id: str) -> str:
    """Who may cancel what: a Cancel counts only for a request sent by the same broker user.

    The broker refuses a message whose ``user_id`` is not the publishing connection's user, and
    gateways set it on requests and cancellations alike, so the key of a Cancel matches a
    request's only when both came from the same gateway deployment: another deployment cannot
    forge the owner's user_id, and a Cancel without one matches only requests without one.
    """
    return f"{message.user_id or ''}\x00{request_id}"


def attempt_of(message: AbstractIncomingMessage) -> int:
    """The attempt number of a delivery: later deliveries of a request always count higher.

    A redelivery (the worker holding it died, or gave it back) is flagged ``redelivered``. A
    request that spilled from an affinity queue (the broker dead-lettered it, recorded in
    ``x-death``) reaches the shared queue as a new message, unflagged, possibly after a worker
    had already started it (taken from the affinity queue, then lost): each death therefore
    counts two, so that the delivery after it outranks a redelivery before it.
    """
    deaths = sum(int(d.get("count", 1)) for d in (getattr(message, "headers", None) or {}).get("x-death") or ()
                 if isinstance(d, dict))
    return 1 + 2 * deaths + (1 if message.redelivered else 0)


class Consumer:
    """Turns deliveries into engine requests and reply streams."""

    def __init__(
        self,
        settings: WorkerSettings,
        engine: ApiEngine,
        publisher: ReplyPublisher,
        on_change: Callable[[], None] = lambda: None,
        on_fatal: Callable[[BaseException], None] = lambda exc: None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher
        self.jobs: dict[str, Job] = {}
        self.cancelled = RecentlyCancelled(settings.cancel_memory)
        self.accepting = False
        self.last_activity = time.monotonic()
        self.completed = 0
        self._on_change = on_change
        self._on_fatal = on_fatal
        self._subscriptions: list[tuple[AbstractQueue, str]] = []  # (queue, consumer tag): shared, affinity
        self._control: AbstractQueue | None = None

    @property
    def in_flight(self) -> int:
        return len(self.jobs)

    # ------------------------------------------------------------------ subscriptions

    async def start_control(self, channel: AbstractChannel) -> None:
        """Own an exclusive control queue on the chatai.control fanout, before taking work."""
        q = await channel.declare_queue(
            topology.worker_control_queue(self.settings.worker_id), exclusive=True, auto_delete=True
        )
        await q.bind(topology.CONTROL_EXCHANGE, routing_key="")
        await q.consume(self._on_control, no_ack=True)
        self._control = q

    async def start(self, channel: AbstractChannel) -> None:
        """Consume the model queue that the broker's definitions declared (never declare it here),
        and this worker's affinity queue (``settings.affinity``).

        The prefetch is channel-wide (``global``: RabbitMQ counts it per channel, across its
        consumers), so both queues share the engine's capacity: a worker never holds more than
        it can run, whichever queue a request came from."""
        await channel.set_qos(prefetch_count=self.engine.max_num_seqs, global_=True)
        name = topology.model_queue(self.settings.served_model_name or "")
        shared = await channel.get_queue(name, ensure=True)  # passive: fails if not defined
        queues = [shared]
        if self.settings.affinity:
            queues.append(await self._declare_affinity(channel))
        self.accepting = True
        args = {"x-priority": self.settings.consumer_priority} if self.settings.consumer_priority else None
        for queue in queues:
            self._subscriptions.append((queue, await queue.consume(self._on_message, no_ack=False, arguments=args)))

    async def _declare_affinity(self, channel: AbstractChannel) -> AbstractQueue:
        """This worker's affinity queue, bound to the affinity exchange by its id. Neither
        exclusive nor auto-delete: a queue that goes drops its messages without dead-lettering
        them, so it must outlive this worker (its policy expires it long after the spill bound)."""
        queue = await channel.declare_queue(topology.worker_affinity_queue(self.settings.worker_id),
                                            durable=False, exclusive=False, auto_delete=False)
        await queue.bind(topology.AFFINITY_EXCHANGE, routing_key="",
                         arguments=topology.affinity_binding(self.settings.worker_id))
        return queue

    async def stop_consuming(self) -> None:
        """Tell the broker to send nothing more; held messages stay ours until acked or rejected.
        What still waits in the affinity queue spills to the shared queue within the bound."""
        self.accepting = False
        subscriptions, self._subscriptions = self._subscriptions, []
        if not subscriptions:
            return
        # Bounded: with the broker away, a robust channel's cancel waits for it to come back, and
        # a worker told to leave would never leave. Without a connection there is nothing to
        # cancel: the broker ended these consumers with it.
        results = await asyncio.gather(
            *(asyncio.wait_for(queue.cancel(tag), CANCEL_TIMEOUT) for queue, tag in subscriptions),
            return_exceptions=True)
        for exc in {type(r).__name__ for r in results if isinstance(r, BaseException)}:
            log.warning("basic.cancel failed: %s", exc)

    # ------------------------------------------------------------------ control

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            cancel = Cancel.model_validate_json(message.body)
        except ValidationError:
            log.warning("ignored a control message that is not a Cancel")
            return
        key = cancel_key(message, cancel.request_id)
        self.cancelled.add(key)
        job = self.jobs.get(cancel.request_id)
        if job is None:
            return
        if cancel_key(job.delivery.message, cancel.request_id) != key:
            log.warning("ignored a cancel for request_id=%s from a user that did not send it", cancel.request_id)
            return
        log.info("cancel request_id=%s reason=%s", cancel.request_id, cancel.reason)
        job.cancelled = True
        await self._abort(job)

    async def _abort(self, job: Job) -> None:
        if not job.aborted:
            job.aborted = True
            self.engine.abort(job.request.request_id)

    # ------------------------------------------------------------------ requests

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        self.last_activity = time.monotonic()
        if not self.accepting:
            # Arrived after we stopped taking work: straight back to the queue for another worker.
            await message.reject(requeue=True)
            return
        try:
            req = ApiRequest.model_validate_json(message.body)
        except ValidationError:
            log.error("dropped an undecodable request message (message_id=%s)", message.message_id)
            await message.ack()
            return
        attempt = attempt_of(message)
        if req.deadline is not None and req.deadline < time.time():
            log.info("dropped expired request_id=%s attempt=%d late_by=%.1fs",
                     req.request_id, attempt, time.time() - req.deadline)
            await message.ack()
            return
        if cancel_key(message, req.request_id) in self.cancelled:
            log.info("dropped cancelled request_id=%s attempt=%d", req.request_id, attempt)
            await message.ack()
            return
        if req.request_id in self.jobs:  # the same id twice at once would confuse engine aborts
            log.warning("duplicate request_id=%s in flight: returned to the queue", req.request_id)
            await message.reject(requeue=True)
            return
        job = Job(delivery=Delivery(message, req.request_id), request=req, attempt=attempt)
        self.jobs[req.request_id] = job
        self._on_change()
        job.task = asyncio.create_task(self._run(job), name=f"req-{req.request_id}")

    async def _run(self, job: Job) -> None:
        """Answer one delivery, then log how it ended (never the body)."""
        req = job.request
        stream = ReplyStream(self.publisher, req, job.attempt, self.settings.worker_id,
                             self.settings.coalesce_ms, self.settings.coalesce_tokens,
                             stream_when_idle=self.settings.stream_when_idle, delivery_lost=lambda: job.delivery.lost,
                             on_lost=lambda: self.engine.abort(req.request_id))
        t0 = time.monotonic()
        outcome = "cancelled"  # unless the attempt comes to one of its ends
        try:
            outcome = await self._attempt(job, stream)
        finally:
            self.jobs.pop(req.request_id, None)
            self.completed += 1
            self.last_activity = time.monotonic()
            self._on_change()
            usage, first = stream.count.usage(), stream.count.first_token_at
            ttft = f"{(first - t0) * 1000:.0f}ms" if first else "-"
            # Never the body: it holds the prompt (docs/security.md, privacy).
            log.info(
                "request_id=%s attempt=%d %s endpoint=%s prompt_tokens=%d completion_tokens=%d handovers=%d ttft=%s "
                "total=%.0fms",
                req.request_id, job.attempt, outcome, req.endpoint, usage.prompt_tokens, usage.completion_tokens,
                stream.handovers, ttft, (time.monotonic() - t0) * 1000,
            )

    async def _attempt(self, job: Job, stream: ReplyStream) -> str:
        """Started, vLLM's response, final; then ack. Or one of two failures, each raised out of
        the stream first (its coalescing timer stops: nothing leaves after it): the message goes
        back to the queue (drain, a dead engine: reject with requeue), or its delivery is gone
        (the broker redelivers it by itself: send nothing more). Anything else: an error frame,
        then ack. Returns the outcome for the log line."""
        req, delivery = job.request, job.delivery
        try:
            async with stream:  # "started" on the way in
                if not job.cancelled:  # a cancel may arrive between delivery and here
                    await self.engine.handle(req, stream, stream.count)
                if job.requeue:
                    raise GiveBack()
                if stream.lost or delivery.lost:
                    raise DeliveryLost()
                await stream.final(aborted=job.cancelled)
            await delivery.ack()
            return "aborted" if job.cancelled else f"final {stream.status}"
        except GiveBack:
            await delivery.requeue()
            return "requeued"
        except EngineDead as exc:
            await delivery.requeue()
            self._on_fatal(exc)
            return "engine dead"
        except DeliveryLost:
            return "delivery lost"
        except Exception as exc:
            if delivery.lost:
                # Connection lost (broker restart, network): the message goes to a worker
                # again. An error frame now would contradict the redelivery, so send none.
                self.engine.abort(req.request_id)
                return f"delivery lost ({type(exc).__name__})"
            log.exception("request_id=%s failed", req.request_id)
            try:
                await stream.error(500, "internal_error", "the worker failed on this request")
                await delivery.ack()
            except Exception:
                log.warning("request_id=%s: could not report the failure", req.request_id)
            return f"error 500 {type(exc).__name__}"

    async def return_remaining(self, whole_only: bool = False) -> int:
        """Abort what is held (only the non-streamed, if ``whole_only``) and give those messages
        back to the broker: at the drain's end, or at its start for whole answers."""
        jobs = [j for j in self.jobs.values() if not (whole_only and j.request.stream)]
        for job in jobs:
            job.requeue = True
            await self._abort(job)
        tasks = [j.task for j in jobs if j.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=10)
        return len(jobs)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is in flight; False if time ran out first."""
        deadline = time.monotonic() + timeout
        while self.jobs:
            tasks = [j.task for j in self.jobs.values() if j.task is not None]
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if tasks:
                await asyncio.wait(tasks, timeout=left)
            else:
                await asyncio.sleep(0.01)
        return True
