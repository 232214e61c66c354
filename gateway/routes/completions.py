"""``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or whole."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from broker_config.messages import Final
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.cluster_errors import ClusterError
from gateway.errors import APIError, to_api_error
from gateway.formatting import ResponseBuilder
from gateway.generation import Generation
from gateway.limits import Lease
from gateway.metrics import REQUESTS, STALLED_STREAMS, model_label
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.streaming import SSE_HEADERS, event_stream

log = logging.getLogger("chatai.gateway.completions")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work`` but cancel it the moment the client hangs up."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        raise ClientGone
    finally:
        for t in (task, watcher):
            if not t.done():
                t.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)


async def _collect(frames: AsyncGenerator) -> Final:
    try:
        async for frame in frames:
            if isinstance(frame, Final):
                return frame
        raise APIError(502, "The worker ended the request without a result.", code="worker_error")
    finally:
        await frames.aclose()


async def _prepend(first: object, frames: AsyncGenerator) -> AsyncGenerator:
    """``first``, then the rest of ``frames``; closing this closes ``frames``."""
    try:
        yield first
        async for frame in frames:
            yield frame
    finally:
        await frames.aclose()


class ClientStalled(Exception):
    pass


async def _within(seconds: float, awaitable: Awaitable[T]) -> T:
    """``awaitable``, or asyncio.TimeoutError after ``seconds``. Python 3.11's ``asyncio.timeout``
    costs a timer per call; ``wait_for`` (3.10) a task, which every SSE chunk would pay."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await awaitable
    return await asyncio.wait_for(awaitable, seconds)


class LeasedStream(StreamingResponse):
    """A stream that holds its key's concurrency slot until the last byte is sent or the client
    leaves, then charges the tokens the request used.

    A client that stops reading fills the socket buffers, and then each send waits. After
    ``send_timeout`` seconds of one send waiting, the stream is given up: closing its frames
    cancels the generation (the worker's slot is freed), and the frames the broker keeps
    delivering meanwhile stop piling up in this process.
    """

    def __init__(self, *args: object, gen: Generation, lease: Lease, send_timeout: float,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.gen, self.lease, self.send_timeout = gen, lease, send_timeout
        self.stalled = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_in_time(message: dict) -> None:
            try:
                await _within(self.send_timeout, send(message))
            except asyncio.TimeoutError:
                self.stalled = True
                raise ClientStalled() from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except Exception:
            if not self.stalled:
                raise
            STALLED_STREAMS.labels(model_label(self.gen.request.model)).inc()
            log.warning("request %s: the client took nothing for %.0f s; stream ended, generation cancelled",
                        self.gen.request.request_id, self.send_timeout)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # cancels a generation still running
            self.lease.release(_tokens_used(self.gen))


def _tokens_used(gen: Generation | None) -> int:
    """Prompt + completion tokens from the final usage; without one (the client left, an error),
    the tokens streamed so far."""
    if gen is None:
        return 0
    final = gen.outcome.final
    if final is not None:
        return final.usage.prompt_tokens + final.usage.completion_tokens
    return gen.outcome.streamed_tokens


async def _serve(kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request,
                 ctx: GatewayContext, key_id: str) -> Response:
    endpoint = "chat" if kind == "chat" else "completions"
    lease: Lease | None = None
    gen: Generation | None = None
    try:
        body.check_supported()
        lease = ctx.admit(key_id)
        gen = Generation.build(ctx.broker, ctx.timeouts, model=body.model, kind=kind,
                               sampling=body.sampling(), stream=body.stream, **body.wire_fields())
        builder = ResponseBuilder(kind, gen.request.request_id, body.model, body.include_usage)
        frames = gen.frames()
        if body.stream:
            try:
                await until_disconnected(request, frames.__anext__())  # the worker's "started"
                # ...and its first output, which travels in the same message: an error the worker
                # finds in the request (a token id beyond the vocabulary, a prompt too long) then
                # still gets its HTTP status instead of an error event in a 200 stream.
                first = await until_disconnected(request, frames.__anext__())
            except BaseException:
                await frames.aclose()
                raise
            frames = _prepend(first, frames)
            REQUESTS.labels(endpoint, model_label(body.model), "200").inc()
            response = LeasedStream(event_stream(frames, builder, body.n), media_type="text/event-stream",
                                    headers={**SSE_HEADERS, **lease.headers}, gen=gen, lease=lease,
                                    send_timeout=ctx.settings.stream_send_timeout)
            lease = None  # the response releases it
            return response
        final = await until_disconnected(request, _collect(frames))
        headers = lease.headers
    except (APIError, ClusterError) as exc:
        REQUESTS.labels(endpoint, model_label(body.model), str(to_api_error(exc).status)).inc()
        raise
    except ClientGone:
        REQUESTS.labels(endpoint, model_label(body.model), "499").inc()
        return Response(status_code=499)
    finally:
        if lease is not None:
            lease.release(_tokens_used(gen))
    REQUESTS.labels(endpoint, model_label(body.model), "200").inc()
    return JSONResponse(builder.completion(final), headers=headers)


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: GatewayContext = Depends(get_context),
                           key_id: str = Depends(require_api_key)) -> Response:
    return await _serve("chat", body, request, ctx, key_id)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request,
                      ctx: GatewayContext = Depends(get_context),
                      key_id: str = Depends(require_api_key)) -> Response:
    return await _serve("completion", body, request, ctx, key_id)
