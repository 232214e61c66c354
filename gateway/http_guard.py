"""The API key and the body size are checked before any handler reads a request body.

FastAPI reads and parses a body (or spools a multipart upload to disk) before it runs a route's
dependencies, so a key check in a dependency comes too late: anyone could make the gateway
buffer gigabytes. This pure ASGI middleware (Starlette's BaseHTTPMiddleware would hide client
disconnects, which cancel generations) runs first:

- every ``/v1`` request needs a valid API key, looked up with the same ``KeyStore.verify`` as
  ``require_api_key``; without one the answer is 401 and not one body byte is read;
- bodies are counted as they arrive, chunked or not: past the limit the request ends with 413
  (a Content-Length over the limit is refused at once). File uploads get the batch file limit
  plus room for the multipart framing; their route applies the exact cap to the file itself.

The key id is left in ``scope["state"]["api_key_id"]`` for later checks of the same request.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.database import DatabaseError
from gateway.errors import APIError, database_unavailable, invalid_api_key
from gateway.keys import KeyStore

API_PREFIX = "/v1"
UPLOAD_PATH = "/v1/files"
MULTIPART_ALLOWANCE = 64 * 1024  # form fields and part headers around an uploaded file


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a body passed its limit (the middleware answers 413)."""


def bearer_token(headers: Headers) -> str | None:
    value = headers.get("authorization", "")
    if value[:7].lower() != "bearer ":
        return None
    return value[7:].strip() or None


def token_matches(headers: Headers, expected: str) -> bool:
    """Constant-time comparison of a request's bearer token with a configured secret."""
    given = bearer_token(headers)
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def too_large(limit: int) -> APIError:
    return APIError(413, f"Request body larger than {limit} bytes.", code="request_too_large")


def file_too_large(max_file_bytes: int) -> APIError:
    """The same answer as the upload route's own cap on the file part."""
    return APIError(413, f"The file is larger than {max_file_bytes} bytes.", code="file_too_large", param="file")


class RequestGuard:
    def __init__(self, app: ASGIApp, keys: Callable[[], KeyStore], max_body_bytes: int,
                 max_file_bytes: int) -> None:
        self.app = app
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.max_file_bytes = max_file_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path: str = scope["path"]
        if path == API_PREFIX or path.startswith(API_PREFIX + "/"):
            token = bearer_token(headers)
            try:
                key_id = self.keys().verify(token) if token else None
            except DatabaseError:
                await _answer(database_unavailable(), scope, receive, send)
                return
            if key_id is None:
                await _answer(invalid_api_key(), scope, receive, send)
                return
            scope.setdefault("state", {})["api_key_id"] = key_id
        if path == UPLOAD_PATH:
            limit, error = self.max_file_bytes + MULTIPART_ALLOWANCE, file_too_large(self.max_file_bytes)
        else:
            limit, error = self.max_body_bytes, too_large(self.max_body_bytes)
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await _answer(error, scope, receive, send)
            return
        await self._limited(scope, receive, send, limit, error)

    async def _limited(self, scope: Scope, receive: Receive, send: Send, limit: int, error: APIError) -> None:
        """Run the app with a ``receive`` that counts body bytes and stops past ``limit``."""
        received = 0
        exceeded = False
        started = False

        async def counting_receive() -> Message:
            nonlocal received, exceeded
            if exceeded:
                raise BodyTooLarge
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise BodyTooLarge
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded and not started:
                return  # whatever the app made of BodyTooLarge (FastAPI turns it into a 400): ours wins
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await _answer(error, scope, receive, send)


async def _answer(error: APIError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer without reading the body; the server discards whatever of it still arrives."""
    await error.response()(scope, receive, send)
