"""Server-sent events from the worker, relayed as they come: vLLM's own chunks, unchanged.

The gateway waits for the worker's ``head`` frame before it sends the HTTP status, so an unknown
model, a full queue, no worker, or a request vLLM refuses still get their 404 / 429 / 503 / 400.
An error after the stream has started cannot change the status any more; it is sent as a last
event ``{"error": {...}}``, as vLLM's server does, which the OpenAI SDK raises as an APIError.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from broker_config.messages import Data, Final
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
