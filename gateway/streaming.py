"""Server-sent events for streamed completions: OpenAI chunks, then ``data: [DONE]``.

The gateway waits for the worker's ``started`` frame before it sends the HTTP status, so an
unknown model, a full queue or no worker still get their 404 / 429 / 503. An error after the
stream has started cannot change the status any more; it is sent as a last event
``{"error": {...}}``, which the OpenAI SDK raises as an APIError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from broker_config.messages import Delta, Final
from gateway.cluster_errors import ClusterError
from gateway.errors import APIError, to_api_error
from gateway.formatting import ResponseBuilder

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


async def event_stream(frames: AsyncGenerator, builder: ResponseBuilder, n: int) -> AsyncIterator[bytes]:
    """The SSE body, from a frame iterator whose ``started`` frame was already consumed."""
    try:
        role = builder.role_chunk(n)
        if role is not None:
            yield sse(role)
        async for frame in frames:
            if isinstance(frame, Delta):
                if frame.text:
                    yield sse(builder.delta_chunk(frame))
            elif isinstance(frame, Final):
                yield sse(builder.finish_chunk(frame))
                if builder.include_usage:
                    yield sse(builder.usage_chunk(frame))
                yield sse("[DONE]")
                return
    except (APIError, ClusterError) as exc:
        yield sse(to_api_error(exc).body())
    finally:
        # Runs also when the client disconnects: closing the frames cancels the generation.
        await frames.aclose()
