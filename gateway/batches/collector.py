"""The batch results collector: takes result frames off the durable results queue into the database.

Results are consumed with manual acks; a message is acked only after its result is committed,
and a result is written only if its line has none yet (``BatchStore.record_result``), so each
custom_id is answered exactly once however often the broker redelivers it. Whatever arrived
meanwhile is committed as one group, in a thread: the database's fsync never blocks the event loop
that serves interactive streams, and a busy batch costs one commit per group, not per line.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractChannel, AbstractIncomingMessage

from broker_config.messages import Error, Final, decode_frame
from broker_config.timing import Backoff, retry_async
from gateway.batches.config import BatchSettings
from gateway.batches.ids import parse_request_id
from gateway.batches.states import OPEN
from gateway.batches.store import BatchStore
from gateway.batches.validation import api_error_line, response_line
from gateway.database import DatabaseError
from gateway.cluster.errors import WorkerFailed
from gateway.metrics import BATCH_RESULTS, MALFORMED_FRAMES

log = logging.getLogger("chatai.gateway.batches")

# Consumes a durable results queue: (callback, prefetch, queue name) -> the consuming channel.
Consume = Callable[[Callable[[AbstractIncomingMessage], Awaitable[None]], int, str], Awaitable[AbstractChannel]]


async def _settle(ack: Awaitable[object]) -> None:
    """Ack or nack; a channel that closed meanwhile makes the broker redeliver, which is fine."""
    try:
        await ack
    except Exception as exc:  # noqa: BLE001
        log.debug("could not settle a result message: %s", type(exc).__name__)


class ResultCollector:
    def __init__(self, store: BatchStore, settings: BatchSettings, on_committed: Callable[[], None],
                 charge: Callable[[str, int], None] = lambda key_id, tokens: None) -> None:
        self.store = store
        self._charge = charge  # a result's tokens count against its key's tokens per minute
        self._charges: list[tuple[str, int]] = []  # (owner, tokens) of the group being committed
        self.settings = settings
        self._on_committed = on_committed  # wakes the feeder: a batch may be complete now
        self._messages: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._channel: AbstractChannel | None = None
        self._stopping = False
        self.duplicates = 0  # results dropped because their line already had one (tests, metrics)

    # ------------------------------------------------------------------ on the event loop

    async def consume(self, consume: Consume, queue_name: str) -> None:
        """Start consuming (retried until the broker is there); the robust connection restores
        the consumer after a reconnect."""
        def failed(exc: Exception, delay: float) -> None:
            log.warning("cannot consume batch results yet (%s); retrying", type(exc).__name__)

        self._channel = await retry_async(
            lambda: consume(self._on_message, self.settings.results_prefetch, queue_name),
            Backoff.fixed(2.0), on_failure=failed)

    async def stop_consuming(self) -> None:
        """Take no more results: those not acked go back to the queue for the next run."""
        self._stopping = True
        if self._channel is not None:
            try:
                await self._channel.close()
            except Exception:  # noqa: BLE001 - the connection may already be gone
                pass

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        if self._stopping:
            return  # not acked: the broker hands it to the next gateway run
        self._messages.put_nowait(message)

    async def write(self) -> None:
        """Group commit, for ever: acks follow the commit; a failed commit nacks (redelivered)."""
        while True:
            messages = [await self._messages.get()]
            while not self._messages.empty() and len(messages) < self.settings.results_prefetch:
                messages.append(self._messages.get_nowait())
            self._charges = []
            try:
                await asyncio.to_thread(self.handle_results, [m.body for m in messages])
            except Exception:
                # Not committed: leave them to the broker (redelivered), never ack a lost result.
                log.exception("could not record %d batch results; they will be redelivered", len(messages))
                await asyncio.sleep(1.0)
                for m in messages:
                    await _settle(m.nack(requeue=True))
                continue
            for owner, tokens in self._charges:  # on the loop, before the feeder looks again
                self._charge(owner, tokens)
            for m in messages:
                await _settle(m.ack())
            self._on_committed()

    # ------------------------------------------------------------------ in a thread

    def handle_results(self, bodies: list[bytes]) -> None:
        """Commit a group of results in one transaction, each frame in a part of its own.

        A frame that cannot be handled (malformed, or naming a line that cannot exist) is
        rolled back alone, counted and dropped: it is acked with the others and never holds up
        the group. Only a database failure sends the whole group back to the broker.
        """
        with self.store.tx():
            for body in bodies:
                try:
                    with self.store.part():
                        self.handle_result(body)
                except DatabaseError:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever the frame did, it goes alone
                    self._malformed(type(exc).__name__)

    def _malformed(self, why: str) -> None:
        """Count and log (never the content: it may be a prompt or a completion)."""
        MALFORMED_FRAMES.labels("batch_results").inc()
        log.warning("dropped a malformed batch result frame (%s)", why)

    def handle_result(self, body: bytes) -> None:
        """Commit one reply frame from the results queue (a no-op for anything but a new result)."""
        try:
            frame = decode_frame(body)
        except ValueError:
            self._malformed("not a frame")
            return
        if not isinstance(frame, (Final, Error)):
            return
        where = parse_request_id(frame.request_id)
        if where is None:
            self._malformed("not a batch line's request id")
            return
        bid, line_no = where
        line = self.store.get_line(bid, line_no)
        if line is None or line.state not in OPEN:
            self._count(False, "duplicate")
            return
        rid = frame.request_id
        if isinstance(frame, Final):
            if frame.aborted:
                batch = self.store.get_batch(bid)
                if batch is not None and batch["status"] == "in_progress":
                    self.store.back_to_pending(bid, [line_no])  # aborted but still wanted: run it again
                else:
                    self.store.cancel_open_lines(bid, line_no)
                return
            body = json.loads(frame.body or "null")  # vLLM's response, as the endpoint would answer
            result = response_line(line.custom_id, frame.status, rid, body)
            usage = (frame.usage.prompt_tokens, frame.usage.completion_tokens)
            ok = frame.status == 200
            recorded = self.store.record_result(bid, line_no, ok, result, usage)
            self._count(recorded, "completed" if ok else "failed")
            batch = self.store.get_batch(bid) if recorded else None
            if batch is not None:
                self._charges.append((batch["owner"], sum(usage)))
        elif isinstance(frame, Error):
            failed = WorkerFailed(frame.status, frame.code, frame.message)
            self._count(self.store.record_result(bid, line_no, False, api_error_line(line.custom_id, rid, failed)),
                        "failed")

    def _count(self, recorded: bool, outcome: str) -> None:
        if not recorded:
            self.duplicates += 1
        BATCH_RESULTS.labels(outcome if recorded else "duplicate").inc()
