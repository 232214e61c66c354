"""What the gateway checks of an OpenAI request body before it goes to a worker: little.

The worker answers with vLLM's own OpenAI layer, which validates every field as vLLM's server
does and stays in step with vLLM as it grows. The gateway keeps only what it needs to route,
limit and protect: the model (a routing key), ``stream``, ``n`` (a cap on what one request may
ask of a GPU), and the rules that hold for this deployment and not for a vLLM server:

- no remote media: GPU nodes have no internet, so an image (or audio, video, file) given by URL
  is refused here with a 400; ``data:`` URLs travel with the request;
- the Responses API is stateless: ``store``, ``previous_response_id`` and ``background`` need
  storage the gateway does not keep, and are refused with a 400 rather than silently ignored.

Every other field goes through untouched, known to this gateway or not: vLLM decides. Batch
lines go through the same checks (``gateway.batches.validation``), so a batch line is accepted
exactly when the same body sent to the endpoint would be.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic_core import from_json

from broker_config.messages import ENDPOINTS
from gateway.errors import APIError

# A model name is an AMQP routing key and part of its queue's name, both at most 255 bytes.
MAX_MODEL_NAME_BYTES = 200
MAX_N = 16  # choices per request: every one runs on the worker at once

# Content parts that name a medium by URL (chat messages and Responses input items).
_MEDIA_PARTS = {"image_url": "image_url", "input_image": "image_url", "audio_url": "audio_url",
                "video_url": "video_url", "input_file": "file_url", "file": "file_url"}


def _bad(message: str, param: str | None = None, code: str = "invalid_request_error") -> APIError:
    return APIError(400, message, code=code, param=param)


@dataclass(frozen=True)
class Routed:
    """A checked request body and what the gateway needs of it."""

    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> Any:
    """JSON with a nesting limit (jiter refuses ~200 levels with a ValueError, where the standard
    library would recurse until RecursionError)."""
    try:
        return from_json(raw)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise _bad("The request body is nested too deeply.", code="invalid_request") from None
        raise _bad("The request body is not valid JSON.", code="invalid_request") from None


def _media_url(part: Any) -> tuple[str, Any] | None:
    """(kind, url) of a content part that refers to media, else None."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    field = _MEDIA_PARTS.get(kind) if isinstance(kind, str) else None
    if field is None:
        return None
    value = part.get(field, part.get(kind))
    url = value.get("url") if isinstance(value, dict) else value
    return kind, url


def _check_media(items: Any, param: str) -> None:
    """Refuse media given by a remote URL anywhere in messages / input items."""
    if not isinstance(items, list):
        return
    for i, item in enumerate(items):
        content = item.get("content") if isinstance(item, dict) else None
        parts = content if isinstance(content, list) else [item]
        for part in parts:
            found = _media_url(part)
            if found is None:
                continue
            kind, url = found
            if isinstance(url, str) and not url.startswith("data:"):
                raise _bad(f"{kind} by URL is not supported: this service's GPU nodes have no internet "
                           "access. Send the content inline as a data: URL (base64).", f"{param}[{i}]",
                           code="unsupported_parameter")


def check_body(endpoint: str, body: Any, batch: bool = False) -> Routed:
    """The gateway's checks of one request body (an API call's or a batch line's); APIError 400."""
    if endpoint not in ENDPOINTS:
        raise _bad(f"The endpoint {endpoint!r} is not served.", "url")
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", "body", code="invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required: the name of a model (GET /v1/models lists them).", "model")
    if len(model.encode()) > MAX_MODEL_NAME_BYTES:
        raise _bad(f"model names are at most {MAX_MODEL_NAME_BYTES} bytes long.", "model")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false.", "stream")
    if stream and batch:
        raise _bad("Batch requests cannot be streamed; remove 'stream'.", "stream", code="invalid_request")
    n = body.get("n")
    if n is not None and (type(n) is not int or not 1 <= n <= MAX_N):
        raise _bad(f"'n' must be an integer from 1 to {MAX_N} on this service.", "n")
    if endpoint == "/v1/chat/completions":
        _check_media(body.get("messages"), "messages")
    elif endpoint == "/v1/responses":
        _check_media(body.get("input"), "input")
        for name in ("store", "background"):
            if body.get(name):
                raise _bad(f"'{name}': this service keeps no responses (the Responses API is stateless "
                           f"here); set {name} to false.", name, code="unsupported_parameter")
        if body.get("previous_response_id"):
            raise _bad("'previous_response_id': this service keeps no responses; send the conversation "
                       "as input items instead.", "previous_response_id", code="unsupported_parameter")
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Routed(endpoint, body, model, stream, include_usage)
