"""One HTTP request to an ASGI app, in-process: no socket, no port, no HTTP parsing.

The worker answers with vLLM's own OpenAI application (``gpu_worker.engine``). Calling that app
as ASGI gives everything its server gives (routing, validation, error bodies, SSE chunks, status
codes) without a listening port on the GPU node, and without copying a line of its serving code.

Cancellation is the ASGI way: ``disconnect()`` makes ``receive`` return ``http.disconnect``,
which vLLM's handlers (``with_cancellation``) and Starlette's ``StreamingResponse`` both listen
for; they abort the engine request. Cancelling the calling task would not be enough: vLLM runs
its handler in a task of its own, which a cancelled caller leaves running.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]


class ResponseSink(Protocol):
    """Where the response goes, piece by piece, as the app sends it."""

    def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def body(self, data: bytes, more: bool) -> None: ...


class AsgiCall:
    """POST ``body`` to ``path`` of ``app``; the response goes to ``sink`` as it is produced."""

    def __init__(self, app: ASGIApp, path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
        self._app = app
        self._body = body
        self._gone = asyncio.Event()
        self._sent_body = False
        self.scope: dict[str, Any] = {
            "type": "http",
            # spec_version below 2.4: Starlette's StreamingResponse then listens for the
            # disconnect message, so disconnect() stops a stream as it stops a whole response.
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": b"",
            "headers": [(b"content-type", b"application/json"),
                        *((k.lower().encode(), v.encode()) for k, v in (headers or {}).items())],
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
            "state": {},
        }

    def disconnect(self) -> None:
        """The client is gone: the app's handler is cancelled and its engine request aborted."""
        self._gone.set()

    async def _receive(self) -> dict:
        if not self._sent_body:
            self._sent_body = True
            return {"type": "http.request", "body": self._body, "more_body": False}
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def run(self, sink: ResponseSink) -> None:
        async def send(message: dict) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                sink.start(message["status"], list(message.get("headers", [])))
            elif kind == "http.response.body":
                await sink.body(message.get("body", b""), bool(message.get("more_body", False)))

        await self._app(self.scope, self._receive, send)
