"""Reply frames for one request attempt: started, coalesced deltas, final or error.

Frames go to the ``chatai.replies`` exchange with the gateway's reply queue as routing key, on a
channel with publisher confirms: the consumer acks the request only once the final frame is
confirmed, so a worker that dies before that loses nothing. Deltas are coalesced: the first one
of a request leaves at once (time to first token), later ones at most every ``coalesce_ms`` or
``coalesce_tokens``, so a loaded worker sends a few messages per second per stream, not one per
token. Non-streamed requests get no deltas: their text travels in the final frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractExchange

from broker_config.messages import (
    CONTENT_TYPE,
    ChoiceEnd,
    Delta,
    Error,
    Final,
    GenerateRequest,
    Started,
    TokenLogprob,
    Usage,
)
from gpu_worker.engine import Step

log = logging.getLogger("chatai.worker.replies")


class ReplyPublisher:
    """Publishes frames on a confirming channel; one per worker."""

    def __init__(self, exchange: AbstractExchange) -> None:
        self._exchange = exchange

    async def publish(self, req: GenerateRequest, body: bytes) -> None:
        msg = aio_pika.Message(
            body,
            content_type=CONTENT_TYPE,
            correlation_id=req.request_id,
            # Batch results must survive a broker restart; interactive text is never written to disk.
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT if req.batch_id else aio_pika.DeliveryMode.NOT_PERSISTENT,
        )
        # mandatory=False: a gateway that went away leaves its frames unroutable; that is no error.
        await self._exchange.publish(msg, routing_key=req.reply_to, mandatory=False)


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)  # pending (streamed) or whole (non-streamed)
    tokens: int = 0  # pending tokens for streams
    logprobs: list[TokenLogprob] = field(default_factory=list)
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
    ) -> None:
        self._pub = publisher
        self.req = req
        self.attempt = attempt
        self._worker_id = worker_id
        self._interval = coalesce_ms / 1000.0
        self._max_tokens = max(1, coalesce_tokens)
        self._seq = 0
        self._lock = asyncio.Lock()
        self._choices: dict[int, _Choice] = {}
        self._pending_tokens = 0
        self._last_flush = 0.0
        self._sent_first = False
        self._timer: asyncio.Task | None = None
        self.prompt_tokens = 0
        self.started_sent = False
        self.messages_sent = 0
        self.deltas_sent = 0

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    async def _send(self, frame) -> None:
        frame.seq = self._seq
        self._seq += 1
        await self._pub.publish(self.req, frame.encode())
        self.messages_sent += 1

    def _frame_kw(self) -> dict:
        return {"request_id": self.req.request_id, "attempt": self.attempt}

    async def started(self, prompt_tokens: int) -> None:
        """Once per attempt; later calls do nothing."""
        if self.started_sent:
            return
        self.started_sent = True
        self.prompt_tokens = prompt_tokens
        async with self._lock:
            await self._send(Started(**self._frame_kw(), worker_id=self._worker_id, prompt_tokens=prompt_tokens))

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
            if c.finish_reason is not None:
                ch.finish_reason, ch.stop_reason = c.finish_reason, c.stop_reason
        if not self.req.stream or self._pending_tokens == 0 or step.finished:
            return  # the final frame flushes what is left
        now = time.monotonic()
        if (
            not self._sent_first
            or self._pending_tokens >= self._max_tokens
            or now - self._last_flush >= self._interval
        ):
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later(self._interval - (now - self._last_flush)))

    async def _flush_later(self, delay: float) -> None:
        await asyncio.sleep(delay)
        self._timer = None
        await self._flush()

    async def _flush(self) -> None:
        """One Delta per choice with pending output."""
        async with self._lock:
            if self._timer is not None and self._timer is not asyncio.current_task():
                self._timer.cancel()
                self._timer = None
            for index in sorted(self._choices):
                ch = self._choices[index]
                if not ch.tokens and not ch.text:
                    continue
                frame = Delta(
                    **self._frame_kw(),
                    index=index,
                    text="".join(ch.text),
                    tokens=ch.tokens,
                    logprobs=list(ch.logprobs) if ch.has_logprobs else None,
                )
                ch.text.clear()
                ch.logprobs.clear()
                ch.tokens = 0
                await self._send(frame)
                self.deltas_sent += 1
            self._pending_tokens = 0
            self._sent_first = True
            self._last_flush = time.monotonic()

    def completion_tokens(self) -> int:
        return sum(ch.total_tokens for ch in self._choices.values())

    async def final(self, n: int) -> None:
        """Flush the stream's tail, then the final frame (awaited: the caller acks after it)."""
        if self.req.stream:
            await self._flush()
        choices = []
        for index in range(n):
            ch = self._choice(index)
            end = ChoiceEnd(index=index, finish_reason=ch.finish_reason or "abort", stop_reason=ch.stop_reason)
            if not self.req.stream:
                end.text = "".join(ch.text)
                end.logprobs = list(ch.logprobs) if ch.has_logprobs else None
            choices.append(end)
        completion = self.completion_tokens()
        usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=completion,
                      total_tokens=self.prompt_tokens + completion)
        async with self._lock:
            await self._send(Final(**self._frame_kw(), choices=choices, usage=usage))

    async def error(self, status: int, code: str, message: str) -> None:
        self.cancel_timer()
        async with self._lock:
            await self._send(Error(**self._frame_kw(), status=status, code=code, message=message))

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
