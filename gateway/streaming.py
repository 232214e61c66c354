"""Server-sent events from the worker, relayed as they come: vLLM's own chunks, unchanged.

The gateway waits for the worker's ``head`` frame before it sends the HTTP status, so an unknown
model, a full queue, no worker, or a request vLLM refuses still get their 404 / 429 / 503 / 400.
An error after the stream has started cannot change the status any more; it is sent as a last
event ``{"error": {...}}``, as vLLM's server does, which the OpenAI SDK raises as an APIError.

The one exception is a cold model's start (``waiting_relay``): minutes without a byte would
let proxies and clients' read timeouts cut the wait, so the status goes out early, once the
broker has accepted the request, and SSE comment lines (which SSE clients, the OpenAI SDK
among them, skip) keep the connection busy until a worker starts the request.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from broker_config.messages import Data, Final, Head
from gateway.cluster.errors import ClusterError
from gateway.errors import APIError, to_api_error

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def relay(frames: AsyncGenerator) -> AsyncIterator[bytes]:
    """The SSE body, from a frame iterator whose ``head`` frame was already consumed."""
    try:
        async for frame in frames:
            if isinstance(frame, Data):
                if frame.data:
                    yield frame.data.encode()
            elif isinstance(frame, Final):
                return
    except (APIError, ClusterError) as exc:
        yield sse(to_api_error(exc).body())
    finally:
        # Runs also when the client disconnects: closing the frames cancels the generation.
        await frames.aclose()


def comment(text: str) -> bytes:
    """An SSE comment line: ignored by SSE clients, shown by the chat page while it waits."""
    return f": {' '.join(text.splitlines())}\n\n".encode()


def waiting_note(model: str, startup_seconds: float | None, waited: float) -> str:
    about = f"about {startup_seconds:.0f} s" if startup_seconds is not None else "start-up time not known yet"
    return f"starting a worker for {model} ({about}); waited {waited:.0f} s"


async def waiting_relay(decisive: asyncio.Future, frames: AsyncGenerator, model: str,
                        startup_seconds: float | None, every: float) -> AsyncIterator[bytes]:
    """The SSE body of a stream committed (200) before a worker started it: a comment every
    ``every`` seconds until the decisive frame (``head``, or a whole ``final``) arrives, then the
    stream as ``relay`` sends it. A failure from then on (no worker in time, vLLM refusing the
    request) can only be the stream's last event, ``{"error": {...}}``, which the SDK raises."""
    began = time.monotonic()
    try:
        while not decisive.done():
            yield comment(waiting_note(model, startup_seconds, time.monotonic() - began))
            await asyncio.wait({decisive}, timeout=every)
        try:
            first = decisive.result()
        except (APIError, ClusterError) as exc:
            yield sse(to_api_error(exc).body())
            return
        if isinstance(first, Head):
            async for chunk in relay(frames):
                yield chunk
        elif isinstance(first, Final) and first.body:  # a whole answer: vLLM refused the request
            try:
                yield sse(json.loads(first.body) if first.status >= 400 else first.body)
            except ValueError:
                yield sse(APIError(first.status, "The worker refused the request.").body())
    finally:
        if not decisive.done():
            decisive.cancel()
        await asyncio.gather(decisive, return_exceptions=True)
        await frames.aclose()  # cancels a generation that has not finished
