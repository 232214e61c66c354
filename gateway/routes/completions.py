"""``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed or whole."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from broker_config.messages import Final
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import APIError
from gateway.formatting import ResponseBuilder
from gateway.generation import Generation
from gateway.metrics import REQUESTS
from gateway.schemas import ChatCompletionRequest, CompletionRequest
from gateway.streaming import SSE_HEADERS, event_stream

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def until_disconnected(request: Request, work: Awaitable[T], poll: float = 0.5) -> T:
    """Run ``work`` but cancel it as soon as the client hangs up (uvicorn would not tell us)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def _collect(frames: AsyncGenerator) -> Final:
    try:
        async for frame in frames:
            if isinstance(frame, Final):
                return frame
        raise APIError(502, "The worker ended the request without a result.", code="worker_error")
    finally:
        await frames.aclose()


async def _serve(kind: str, body: ChatCompletionRequest | CompletionRequest, request: Request,
                 ctx: GatewayContext) -> Response:
    endpoint = "chat" if kind == "chat" else "completions"
    try:
        body.check_supported()
        fields = ({"messages": body.wire_messages()} if isinstance(body, ChatCompletionRequest)
                  else {"prompt": body.prompt_text})
        gen = Generation.build(ctx.broker, ctx.timeouts, model=body.model, kind=kind,
                               sampling=body.sampling(), stream=body.stream, **fields)
        builder = ResponseBuilder(kind, gen.request.request_id, body.model, body.include_usage)
        frames = gen.frames()
        if body.stream:
            try:
                await until_disconnected(request, frames.__anext__())  # the worker's "started"
            except BaseException:
                await frames.aclose()
                raise
            REQUESTS.labels(endpoint, body.model, "200").inc()
            return StreamingResponse(event_stream(frames, builder, body.n), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        final = await until_disconnected(request, _collect(frames))
    except APIError as exc:
        REQUESTS.labels(endpoint, body.model, str(exc.status)).inc()
        raise
    except ClientGone:
        REQUESTS.labels(endpoint, body.model, "499").inc()
        return Response(status_code=499)
    REQUESTS.labels(endpoint, body.model, "200").inc()
    return JSONResponse(builder.completion(final))


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           ctx: GatewayContext = Depends(get_context)) -> Response:
    return await _serve("chat", body, request, ctx)


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request,
                      ctx: GatewayContext = Depends(get_context)) -> Response:
    return await _serve("completion", body, request, ctx)
