"""The OpenAI endpoints a worker answers (chat, completions, Responses, embeddings): relayed.

The gateway authenticates, limits, checks a little (``gateway.schemas``), routes by model and
relays: the worker's vLLM layer writes the response, and it goes out unchanged, with vLLM's
status code. A streamed request gets its HTTP status only once a worker has started it and
vLLM has begun its answer (or refused the request with a status of its own); except while a
cold model's worker starts (``gateway/cluster/cold_start.py``): once the broker has accepted the
request (no 404 or 429 can follow) and ``stream_keepalive`` seconds have passed, it gets 200 and
SSE comments until the worker starts it, and a later failure is the stream's error event.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from broker_config.messages import ENDPOINTS, Final, Head
from gateway.cluster.cold_start import plan_start
from gateway.cluster.errors import ClusterError, ModelNotFound
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.cluster.generation import Generation
from gateway.errors import APIError, to_api_error
from gateway.limits import Lease
from gateway.metrics import REQUESTS, STALLED_STREAMS, model_label
from gateway.routes.models import known_models
from gateway.schemas import Routed, check_body, parse_json
from gateway.streaming import SSE_HEADERS, relay, waiting_relay

log = logging.getLogger("chatai.gateway.inference")
router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
T = TypeVar("T")


class ClientGone(Exception):
    pass


async def _disconnected(request: Request) -> None:
    """Returns when the client hangs up (the body was read already, so only that can arrive)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


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


async def _decisive(frames: AsyncGenerator) -> Head | Final:
    """The frame that decides the HTTP response: a streamed answer's head, or a whole one."""
    try:
        while True:
            frame = await frames.__anext__()  # the worker's "started" first
            if isinstance(frame, (Head, Final)):
                return frame
    except StopAsyncIteration:
        raise APIError(502, "The worker ended the request without a result.", code="worker_error") from None


async def _answer(frames: AsyncGenerator, request: Request, commit_after: float | None = None,
                  committable: Callable[[], bool] = lambda: False) -> Head | Final | asyncio.Future:
    """The decisive frame; or, given ``commit_after``, the task still waiting for it once that many
    seconds have passed and ``committable()`` holds (the caller then owns the task)."""
    decisive = asyncio.ensure_future(_decisive(frames))
    watcher = asyncio.ensure_future(_disconnected(request))
    handed_over = False
    try:
        while True:
            await asyncio.wait({decisive, watcher}, timeout=commit_after, return_when=asyncio.FIRST_COMPLETED)
            if decisive.done():
                return decisive.result()
            if watcher.done():
                raise ClientGone
            if committable():
                handed_over = True
                return decisive
    finally:
        watcher.cancel()
        if not handed_over and not decisive.done():
            decisive.cancel()  # the frames' generator ends with it (and cancels the request)
        await asyncio.gather(watcher, *(() if handed_over else (decisive,)), return_exceptions=True)


# The endpoint label of the request metrics.
_LABELS = {"/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/responses": "responses",
           "/v1/embeddings": "embeddings"}


async def _serve(routed: Routed, request: Request, ctx: GatewayContext, key_id: str) -> Response:
    endpoint = _LABELS[routed.endpoint]
    label = model_label(routed.model)
    lease: Lease | None = None
    gen: Generation | None = None
    try:
        lease = ctx.admit(key_id, routed.choices)
        model = ctx.registry.queue_for(routed.model)
        plan = await plan_start(ctx.registry, ctx.broker, model, ctx.settings.queue_timeout,
                                ctx.settings.cold_start_timeout_for(model))
        affinity = ctx.affinity
        keys = affinity.keys(model, routed.body)
        gen = Generation.build(ctx.broker, replace(ctx.timeouts, queue=plan.wait, cold_start=plan.cold), model=model,
                               endpoint=routed.endpoint, body=routed.body, stream=routed.stream,
                               prefer=affinity.prefer(model, keys),
                               on_started=lambda worker_id: affinity.started(keys, worker_id),
                               on_final=affinity.finished)
        frames = gen.frames()
        keepalive = ctx.settings.stream_keepalive if routed.stream and plan.cold else None
        try:
            first = await _answer(frames, request, keepalive, lambda: gen.published)
        except BaseException:
            await frames.aclose()
            raise
        if isinstance(first, asyncio.Future):  # a cold start: committed to 200, comments until it starts
            REQUESTS.labels(endpoint, label, "200").inc()
            body = waiting_relay(first, frames, routed.model, plan.view.startup_seconds, keepalive or 0.0)
            response = LeasedStream(body, status_code=200, media_type="text/event-stream",
                                    headers={**SSE_HEADERS, **lease.headers}, gen=gen, lease=lease,
                                    send_timeout=ctx.settings.stream_send_timeout)
            lease = None  # the response releases it
            return response
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
        if isinstance(exc, ModelNotFound):
            raise ModelNotFound(exc.model, known_models(ctx)) from None
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
    caps = ctx.caps()
    body = parse_json(await request.body(), caps.max_json_values)  # counted before it is parsed
    return await _serve(check_body(endpoint, body, caps=caps), request, ctx, key_id)


def _route(endpoint: str):
    async def relay_endpoint(request: Request, ctx: GatewayContext = Depends(get_context),
                             key_id: str = Depends(require_api_key)) -> Response:
        return await _relayed(endpoint, request, ctx, key_id)

    return relay_endpoint


# One route per endpoint the workers serve, so that each shows in the API reference; the body is
# the client's own (FastAPI does not parse it: vLLM's layer does, on the worker).
for _endpoint in ENDPOINTS:
    router.add_api_route(_endpoint.removeprefix("/v1"), _route(_endpoint), methods=["POST"],
                         name=_LABELS[_endpoint], summary=f"POST {_endpoint}, answered by vLLM's layer on a worker")
