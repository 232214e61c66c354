"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}``.

Every failure a client can see goes through ``APIError``, so the status code, the type and
the machine-readable code stay consistent across endpoints and the SDK raises the right class.
The cluster's own failures (``gateway/cluster/errors.py``) become HTTP here and nowhere else
(``to_api_error``, used by the exception handlers, the SSE error event and batch error lines).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.cluster.errors import (
    ClusterError,
    ClusterOverloaded,
    ClusterUnavailable,
    ModelNotFound,
    ModelNotLoaded,
    NoWorkerAvailable,
    QueueFull,
    WorkerFailed,
    WorkerLost,
    WorkerTimeout,
)
from gateway.database import DatabaseError

_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers: dict[str, str] = {}  # extra response headers (e.g. retry-after on a 429)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else {}
        return JSONResponse(self.body(), status_code=self.status, headers={**headers, **self.headers})


def invalid_api_key() -> APIError:
    return APIError(401, "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key")


def database_unavailable() -> APIError:
    """The gateway's database (PostgreSQL shared by replicas) cannot be reached: keys cannot be
    checked, so nothing is served, but the client may retry (the SDK does on 503)."""
    err = APIError(503, "The gateway's database is unreachable; please retry shortly.", code="database_unavailable")
    err.headers = {"retry-after": "2"}
    return err


# A cluster failure's HTTP status, OpenAI code and offending parameter.
_CLUSTER_HTTP: dict[type[ClusterError], tuple[int, str, str | None]] = {
    ModelNotFound: (404, "model_not_found", "model"),
    QueueFull: (429, "queue_full", None),
    ClusterUnavailable: (503, "service_paused", None),
    ClusterOverloaded: (503, "cluster_overloaded", None),
    NoWorkerAvailable: (503, "no_worker_available", None),
    ModelNotLoaded: (503, "model_not_loaded", None),
    WorkerLost: (502, "worker_lost", None),
    WorkerTimeout: (504, "worker_timeout", None),
}


def to_api_error(exc: APIError | ClusterError) -> APIError:
    """The client's view of a failure: an APIError as it is, a cluster failure mapped."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, WorkerFailed):  # the worker chose the status and code
        return APIError(exc.status, exc.message, code=exc.code)
    error = APIError(502, exc.message, code="cluster_error")
    for cls in type(exc).__mro__:
        if cls in _CLUSTER_HTTP:
            status, code, param = _CLUSTER_HTTP[cls]
            error = APIError(status, exc.message, code=code, param=param)
            break
    if exc.retry_after is not None:
        error.headers["retry-after"] = f"{exc.retry_after:g}"
    if exc.should_retry is not None:  # the OpenAI SDKs obey it before their own retry rules
        error.headers["x-should-retry"] = "true" if exc.should_retry else "false"
    return error


def model_not_found(model: str, known: Iterable[str] = ()) -> APIError:
    return to_api_error(ModelNotFound(model, known))


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON.", None
    if param:
        return f"Invalid value for '{param}': {msg}.", param
    return f"Invalid request body: {msg}.", None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(ClusterError)
    async def _cluster_error(_: Request, exc: ClusterError) -> JSONResponse:
        return to_api_error(exc).response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, code="invalid_request", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    async def _database(_: Request, exc: Exception) -> JSONResponse:
        import logging

        logging.getLogger("chatai.gateway").error("database unavailable (%s)", type(exc).__name__)
        return database_unavailable().response()

    for database_error in DatabaseError:
        app.exception_handler(database_error)(_database)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # The exception text may quote request content: log its type only.
        import logging

        logging.getLogger("chatai.gateway").error("unhandled %s", type(exc).__name__)
        return APIError(500, "Internal server error.", code="internal_error").response()
