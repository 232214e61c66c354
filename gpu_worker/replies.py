"""Reply frames for one request attempt: started, then vLLM's response (whole, or coalesced
server-sent events), final or error.

Frames go to the ``chatai.replies`` exchange with the gateway's reply queue as routing key, on a
channel with publisher confirms. Only the last frame (final or error) is awaited until the broker
confirms it: the consumer acks the request after that, so a worker that dies before loses
nothing, and since confirms follow publish order, the frames before it are settled too. Other
frames are published without waiting for their confirms, so a slow broker round trip never holds
back the next token.

A streamed response's events are coalesced only under load: the first piece of a request leaves
at once (time to first token), and so does every later one while the publisher is idle (all
earlier messages confirmed, none waiting), so a lightly used path streams token by token as
vLLM's server does. While messages are still in flight, pieces wait up to ``coalesce_ms`` or
``coalesce_tokens`` output tokens, so a loaded worker sends a few messages per second per
stream, not one per token: the broker's confirms pace it, the way Nagle's algorithm lets
acknowledgements pace a TCP sender. Frames that are
ready together travel as one message: those of one request (``head`` with the first ``data``, the
last ``data`` with ``final``), and those of all the requests for one gateway that are handed over
in the same turn of the event loop (one engine step wakes every running request), so a worker
with 256 streams sends one message per step and gateway, not 256 (see ``broker_config.messages``).
A whole (not streamed) response travels in the final frame. Batch results go one frame per
persistent message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractExchange

from broker_config.connection import publish
from broker_config.messages import (
    CONTENT_TYPE,
    ApiRequest,
    Data,
    Error,
    Final,
    Frame,
    Head,
    Started,
    encode_frames,
)
from gpu_worker.token_count import TokenCount

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

    def idle(self) -> bool:
        """Nothing waits to be published or confirmed: the path has kept up with everything so
        far, so a frame sent now costs nobody a wait (``ReplyStream`` then skips its window)."""
        return not self._unconfirmed and not self._bundles

    def send(self, req: ApiRequest, frames: list[Frame]) -> asyncio.Future:
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


def _openai_error(status: int, body: str) -> str:
    """vLLM's own errors are in the OpenAI format already; a bare framework error (a route this
    model does not serve: ``{"detail": "Not Found"}``) is put into it, with the same status."""
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return body
    detail = parsed.get("detail") if isinstance(parsed, dict) else None
    if status == 404 and detail == "Not Found":
        message = "This model does not serve this endpoint (see GET /v1/models for what it serves)."
    else:
        message = detail if isinstance(detail, str) else "The request failed on the worker."
    return json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None,
                                 "code": status}})


def _content_type(headers: list[tuple[bytes, bytes]]) -> str:
    for name, value in headers:
        if name.lower() == b"content-type":
            return value.decode("latin-1")
    return CONTENT_TYPE


class ReplyStream:
    """The frames of one attempt of one request: the sink vLLM's response is written into.

    A response that arrives as one body (every non-streamed answer, and vLLM's errors) is kept
    whole and travels in the final frame with its status. One that arrives in pieces (server-sent
    events) opens with a ``head`` frame and goes on in coalesced ``data`` frames.
    """

    def __init__(
        self,
        publisher: ReplyPublisher,
        req: ApiRequest,
        attempt: int,
        worker_id: str,
        coalesce_ms: float = 20.0,
        coalesce_tokens: int = 16,
        stream_when_idle: bool = True,
        clock: Callable[[], float] = time.monotonic,
        delivery_lost: Callable[[], bool] = lambda: False,
        on_lost: Callable[[], None] = lambda: None,
    ) -> None:
        self._pub = publisher
        # The request's channel closed mid-stream: the broker redelivers it elsewhere, so this
        # attempt stops at once (on_lost aborts it) and ships nothing more.
        self._delivery_lost, self._on_lost = delivery_lost, on_lost
        self.lost = False
        self.req = req
        self.attempt = attempt
        self._worker_id = worker_id
        self._interval = coalesce_ms / 1000.0
        self._max_tokens = max(1, coalesce_tokens)
        self._stream_when_idle = stream_when_idle
        self._clock = clock
        self._seq = 0
        self._outbox: list[Frame] = []
        self._pending: list[bytes] = []
        self._reported_tokens = 0  # output tokens already counted in a data frame
        self._last_flush = 0.0
        self._sent_first = False
        self._timer: asyncio.TimerHandle | None = None
        self.count = TokenCount()  # the engine's token counts for this request (gpu_worker.engine)
        self.status = 200
        self.content_type = CONTENT_TYPE
        self.streaming = False
        self._whole: list[bytes] = []
        self.started_sent = False
        self.handovers = 0  # frame groups handed to the publisher (it may bundle them further)

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

    async def started(self) -> None:
        """Once per attempt, as soon as the request is taken: the gateway stops waiting for a
        worker here (however long the first output then takes), and knows whom to watch."""
        if self.started_sent:
            return
        self.started_sent = True
        self._outbox.append(Started(**self._frame_kw(), worker_id=self._worker_id))
        self._ship()

    async def __aenter__(self) -> "ReplyStream":
        await self.started()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """However the attempt leaves the stream, its coalescing timer ships nothing after."""
        self.cancel_timer()

    # ------------------------------------------------------------------ the response (ResponseSink)

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.content_type = status, _content_type(headers)

    async def body(self, data: bytes, more: bool) -> None:
        if self.lost:
            return
        if more and self._delivery_lost():
            self.lost = True
            self._on_lost()
            return
        if not self.streaming:
            if not more:  # the whole response (or its last piece, after no streamed one)
                self._whole.append(data)
                return
            self.streaming = True
            self._outbox.append(Head(**self._frame_kw(), status=self.status, content_type=self.content_type))
            self._pending.extend(self._whole)
            self._whole.clear()
        if data:
            self._pending.append(data)
        if not more:
            return  # the rest goes with the final frame
        pending_tokens = self.count.completion_tokens - self._reported_tokens
        now = self._clock()
        if (not self._sent_first or pending_tokens >= self._max_tokens or now - self._last_flush >= self._interval
                or (self._stream_when_idle and self._pub.idle())):  # an idle path: each piece as it comes, as vLLM's server sends it
            self._flush()
        elif self._timer is None:
            delay = self._interval - (now - self._last_flush)
            self._timer = asyncio.get_running_loop().call_later(delay, self._flush)

    def _take_data(self) -> None:
        """Move the pending events into the outbox as one Data frame."""
        if not self._pending:
            return
        tokens = self.count.completion_tokens
        self._outbox.append(Data(**self._frame_kw(), data=b"".join(self._pending).decode("utf-8", "replace"),
                                 tokens=tokens - self._reported_tokens))
        self._reported_tokens = tokens
        self._pending.clear()

    def _flush(self) -> None:
        """Pending events (and a waiting head), shipped as one message."""
        self.cancel_timer()
        self._take_data()
        self._sent_first = True
        self._last_flush = self._clock()
        self._ship()

    # ------------------------------------------------------------------ the end

    async def final(self, aborted: bool = False) -> None:
        """The stream's tail and the final frame, in one message (awaited: the caller acks after it)."""
        self.cancel_timer()
        self._take_data()
        body = None
        if not self.streaming:
            body = b"".join(self._whole).decode("utf-8", "replace")
            if self.status >= 400:
                body = _openai_error(self.status, body)
        self._outbox.append(Final(**self._frame_kw(), usage=self.count.usage(), status=self.status,
                                  content_type=self.content_type, body=body, aborted=aborted))
        await self._ship()

    async def error(self, status: int, code: str, message: str) -> None:
        self.cancel_timer()
        self._outbox.append(Error(**self._frame_kw(), status=status, code=code, message=message))
        await self._ship()

    def cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
