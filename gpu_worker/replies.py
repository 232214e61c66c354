"""Reply frames for one request attempt: started, coalesced deltas, final or error.

Frames go to the ``chatai.replies`` exchange with the gateway's reply queue as routing key, on a
channel with publisher confirms. Only the last frame (final or error) is awaited until the broker
confirms it: the consumer acks the request after that, so a worker that dies before loses
nothing, and since confirms follow publish order, the frames before it are settled too. Started
and delta frames are published without waiting for their confirms, so a slow broker round trip
never holds back the next token.

Deltas are coalesced: the first one of a request leaves at once (time to first token), later ones
at most every ``coalesce_ms`` or ``coalesce_tokens``, so a loaded worker sends a few messages per
second per stream, not one per token. Frames that are ready together travel as one message: those
of one request (``started`` with the first delta, the last delta with ``final``), and those of all
the requests for one gateway that are handed over in the same turn of the event loop (one engine
step wakes every running request), so a worker with 256 streams sends one message per step and
gateway, not 256 (see ``broker_config.messages``). Non-streamed requests get no deltas: their
text travels in the final frame. Batch results go one frame per persistent message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange

from broker_config.connection import publish
from broker_config.messages import (
    CONTENT_TYPE,
    ChoiceEnd,
    Delta,
    Error,
    Final,
    Frame,
    GenerateRequest,
    Started,
    TokenLogprob,
    Usage,
    encode_frames,
)
from gpu_worker.engine import Step

log = logging.getLogger("chatai.worker.replies")


@dataclass
class _Bundle:
    """Interactive frames for one gateway, waiting for the end of this turn of the event loop."""

    frames: list[Frame]
    settled: asyncio.Future  # the bundle's publish: done when the broker confirmed it


class ReplyPublisher:
    """Publishes reply frames on one confirming channel, in the order they are handed over.

    Interactive frames handed over in one turn of the event loop are bundled per gateway and
    published by a callback at the end of that turn: no added wait, one message for many
    streams. Every publish runs as a task created at flush time: tasks start in creation order
    and aio-pika/aiormq write a channel's frames under a FIFO lock before their first real
    wait, so the broker receives messages in hand-over order whether or not the caller awaits
    the confirm.
    """

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange
        self._unconfirmed: set[asyncio.Task] = set()
        self._bundles: dict[str, _Bundle] = {}  # by gateway reply queue

    def send(self, req: GenerateRequest, frames: list[Frame]) -> asyncio.Future:
        """Hand frames over; the returned future is done when the broker has confirmed them."""
        if req.batch_id is not None:
            # Batch results must survive a broker restart and are acked one by one at the gateway.
            task: asyncio.Future | None = None
            for frame in frames:
                task = self._publish(req.reply_to, encode_frames([frame]), persistent=True)
            assert task is not None, "send() needs at least one frame"
            return task
        bundle = self._bundles.get(req.reply_to)
        if bundle is None:
            loop = asyncio.get_running_loop()
            if not self._bundles:
                loop.call_soon(self._flush)
            bundle = self._bundles[req.reply_to] = _Bundle([], loop.create_future())
        bundle.frames.extend(frames)
        return bundle.settled

    def _flush(self) -> None:
        bundles, self._bundles = self._bundles, {}
        for reply_to, bundle in bundles.items():
            # Interactive text is never written to disk: not persistent.
            task = self._publish(reply_to, encode_frames(bundle.frames), persistent=False)
            task.add_done_callback(lambda t, f=bundle.settled: _settle_from(f, t))

    def _publish(self, reply_to: str, body: bytes, persistent: bool) -> asyncio.Task:
        msg = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        # mandatory=False: a gateway that went away leaves its frames unroutable; that is no error.
        task = asyncio.ensure_future(publish(self._exchange, msg, routing_key=reply_to, mandatory=False))
        self._unconfirmed.add(task)
        task.add_done_callback(self._settled)
        return task

    def _settled(self, task: asyncio.Task) -> None:
        self._unconfirmed.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # The last frame of the request is awaited and fails there too; this only says why.
            log.debug("a reply publish failed: %s", type(exc).__name__)


def _settle_from(future: asyncio.Future, task: asyncio.Task) -> None:
    if future.done():
        return
    if task.cancelled():
        future.cancel()
    elif (exc := task.exception()) is not None:
        future.set_exception(exc)
    else:
        future.set_result(None)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)  # pending (streamed) or whole (non-streamed)
    tokens: int = 0  # pending tokens for streams
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs: sent once, with the next delta
    total_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    has_logprobs: bool = False


class ReplyStream:
    """The frames of one attempt of one request, with sequence numbers and coalescing."""

    def __init__(
        self,
        publisher: ReplyPublisher,
        req: GenerateRequest,
        attempt: int,
        worker_id: str,
        coalesce_ms: float = 20.0,
        coalesce_tokens: int = 16,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pub = publisher
        self.req = req
        self.attempt = attempt
        self._worker_id = worker_id
        self._interval = coalesce_ms / 1000.0
        self._max_tokens = max(1, coalesce_tokens)
        self._clock = clock
        self._seq = 0
        self._outbox: list[Frame] = []
        self._choices: dict[int, _Choice] = {}
        self._pending_tokens = 0
        self._last_flush = 0.0
        self._sent_first = False
        self._timer: asyncio.TimerHandle | None = None
        self.prompt_tokens = 0
        self.started_sent = False
        self.handovers = 0  # frame groups handed to the publisher (it may bundle them further)
        self.deltas_sent = 0

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    def _frame_kw(self) -> dict:
        self._seq += 1
        return {"request_id": self.req.request_id, "attempt": self.attempt, "seq": self._seq - 1}

    def _ship(self) -> asyncio.Future | None:
        """Hand the outbox to the publisher, which decides how the frames travel."""
        frames, self._outbox = self._outbox, []
        if not frames:
            return None
        self.handovers += 1
        return self._pub.send(self.req, frames)

    async def started(self, prompt_tokens: int) -> None:
        """Once per attempt; later calls do nothing. A stream's ``started`` waits for its first
        delta (same engine step) so both travel in one message."""
        if self.started_sent:
            return
        self.started_sent = True
        self.prompt_tokens = prompt_tokens
        self._outbox.append(Started(**self._frame_kw(), worker_id=self._worker_id, prompt_tokens=prompt_tokens))
        if not self.req.stream:
            self._ship()

    async def add(self, step: Step) -> None:
        """Take one engine step; publishes when the coalescing rule says so."""
        for c in step.choices:
            ch = self._choice(c.index)
            ch.total_tokens += c.tokens
            if c.text:
                ch.text.append(c.text)
            ch.tokens += c.tokens
            self._pending_tokens += c.tokens
            if c.logprobs is not None:
                ch.has_logprobs = True
                ch.logprobs.extend(c.logprobs)
            if c.prompt_logprobs is not None:
                ch.prompt_logprobs = c.prompt_logprobs
            if c.finish_reason is not None:
                ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
        if self.req.stream and self._pending_tokens and not step.finished:
            now = self._clock()
            if (not self._sent_first or self._pending_tokens >= self._max_tokens
                    or now - self._last_flush >= self._interval):
                self._flush()
            elif self._timer is None:
                delay = self._interval - (now - self._last_flush)
                self._timer = asyncio.get_running_loop().call_later(delay, self._flush)
        # The final frame carries whatever is left; anything else waiting (a started) goes now.
        if not step.finished:
            self._ship()

    def _take_deltas(self) -> None:
        """Move each choice's pending output into the outbox as one Delta."""
        for index in sorted(self._choices):
            ch = self._choices[index]
            if not ch.tokens and not ch.text:
                continue
            self._outbox.append(Delta(**self._frame_kw(), index=index, text="".join(ch.text), tokens=ch.tokens,
                                      logprobs=list(ch.logprobs) if ch.has_logprobs else None,
                                      prompt_logprobs=ch.prompt_logprobs))
            ch.prompt_logprobs = None
            ch.text.clear()
            ch.logprobs.clear()
            ch.tokens = 0
            self.deltas_sent += 1
        self._pending_tokens = 0

    def _flush(self) -> None:
        """Pending deltas (and a waiting started), shipped as one message."""
        self.cancel_timer()
        self._take_deltas()
        self._sent_first = True
        self._last_flush = self._clock()
        self._ship()

    def completion_tokens(self) -> int:
        return sum(ch.total_tokens for ch in self._choices.values())

    async def final(self, n: int) -> None:
        """The stream's tail and the final frame, in one message (awaited: the caller acks after it)."""
        self.cancel_timer()
        if self.req.stream:
            self._take_deltas()
        choices = []
        for index in range(n):
            ch = self._choice(index)
            end = ChoiceEnd(index=index, finish_reason=ch.finish_reason or "abort", stop_reason=ch.stop_reason)
            if not self.req.stream:
                end.text = "".join(ch.text)
                end.logprobs = list(ch.logprobs) if ch.has_logprobs else None
                end.prompt_logprobs = ch.prompt_logprobs
            choices.append(end)
        completion = self.completion_tokens()
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                      total_tokens=self.prompt_tokens + completion)
        self._outbox.append(Final(**self._frame_kw(), choices=choices, usage=usage))
        await self._ship()

    async def error(self, status: int, code: str, message: str) -> None:
        self.cancel_timer()
        self._outbox.append(Error(**self._frame_kw(), status=status, code=code, message=message))
        await self._ship()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
