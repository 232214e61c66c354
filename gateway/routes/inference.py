"""The OpenAI endpoints a worker answers (chat, completions, Responses, embeddings): relayed.

The gateway authenticates, limits, checks a little (``gateway.schemas``), routes by model and
relays: the worker's vLLM layer writes the response, and it goes out unchanged, with vLLM's
status code. A streamed request gets its HTTP status only once a worker has started it and
vLLM has begun its answer (or refused the request with a status of its own).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from broker_config.messages import Final, Head
from broker_config.timing import first_of
from gateway.cluster.errors import ClusterError
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import APIError, to_api_error
from gateway.cluster.generation import Generation
from gateway.limits import Lease
from gateway.metrics import REQUESTS, STALLED_STREAMS, model_label
from gateway.schemas import Routed, check_body, parse_json
from gateway.streaming import SSE_HEADERS, relay

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
    if task in await first_of(task, _disconnected(request)):
        return task.result()
    raise ClientGone


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


async def _answer(frames: AsyncGenerator, request: Request) -> Head | Final:
    """The frame that decides the HTTP response: a streamed answer's head, or a whole one."""
    try:
        await until_disconnected(request, frames.__anext__())  # the worker's "started"
        while True:
            frame = await until_disconnected(request, frames.__anext__())
            if isinstance(frame, (Head, Final)):
                return frame
    except StopAsyncIteration:
        raise APIError(502, "The worker ended the request without a result.", code="worker_error") from None


# The endpoint label of the request metrics.
_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
           "/v1/embeddings": "embeddings"}


async def _serve(routed: Routed, request: Request, ctx: GatewayContext, key_id: str) -> Response:
    endpoint = _LABELS[routed.endpoint]
    label = model_label(routed.model)
    lease: Lease | None = None
    gen: Generation | None = None
    try:
        lease = ctx.admit(key_id)
        gen = Generation.build(ctx.broker, ctx.timeouts, model=ctx.registry.queue_for(routed.model),
                               endpoint=routed.endpoint, body=routed.body, stream=routed.stream)
        frames = gen.frames()
        try:
            first = await _answer(frames, request)
        except BaseException:
            await frames.aclose()
            raise
        if isinstance(first, Head):
            REQUESTS.labels(endpoint, label, str(first.status)).inc()
            response = LeasedStream(relay(frames), status_code=first.status, media_type=first.content_type,
                                    headers={**SSE_HEADERS, **lease.headers}, gen=gen, lease=lease,
                                    send_timeout=ctx.settings.stream_send_timeout)
            lease = None  # the response releases it
            return response
        await frames.aclose()
        final, headers = first, lease.headers
    except (APIError, ClusterError) as exc:
        REQUESTS.labels(endpoint, label, str(to_api_error(exc).status)).inc()
        raise
    except ClientGone:
        REQUESTS.labels(endpoint, label, "499").inc()
        return Response(status_code=499)
    finally:
        if lease is not None:
            lease.release(_tokens_used(gen))
    REQUESTS.labels(endpoint, label, str(final.status)).inc()
    return Response(final.body or "", status_code=final.status, media_type=final.content_type, headers=headers)


async def _relayed(endpoint: str, request: Request, ctx: GatewayContext, key_id: str) -> Response:
    return await _serve(check_body(endpoint, parse_json(await request.body())), request, ctx, key_id)


# One route per endpoint, so that each shows in the API reference; the body is the client's own
# (FastAPI does not parse it: vLLM's layer does, on the worker).
@router.post("/chat/completions")
async def chat_completions(request: Request, ctx: GatewayContext = Depends(get_context),
                           key_id: str = Depends(require_api_key)) -> Response:
    return await _relayed("/v1/chat/completions", request, ctx, key_id)


@router.post("/completions")
async def completions(request: Request, ctx: GatewayContext = Depends(get_context),
                      key_id: str = Depends(require_api_key)) -> Response:
    return await _relayed("/v1/completions", request, ctx, key_id)


@router.post("/responses")
async def responses(request: Request, ctx: GatewayContext = Depends(get_context),
                    key_id: str = Depends(require_api_key)) -> Response:
    return await _relayed("/v1/responses", request, ctx, key_id)


@router.post("/embeddings")
async def embeddings(request: Request, ctx: GatewayContext = Depends(get_context),
                     key_id: str = Depends(require_api_key)) -> Response:
    return await _relayed("/v1/embeddings", request, ctx, key_id)
