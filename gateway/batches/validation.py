"""Turning an uploaded JSONL file into batch lines, line by line.

A bad line does not sink the batch: it becomes an error line (OpenAI's batch error format)
with its custom_id, when it has one, and a reason; every other line runs. Only a file that
cannot be a batch at all (not UTF-8 text, no request line, too many lines) fails the batch.

Bodies go through the same pydantic models and ``check_supported`` as interactive requests,
so a batch line is accepted exactly when the same body sent to the endpoint would be.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.errors import APIError
from gateway.schemas import ChatCompletionRequest, CompletionRequest

ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}


class BatchFileError(Exception):
    """The file as a whole cannot be run: the batch fails with this code and message."""

    def __init__(self, code: str, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.line = code, message, line


def line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def error_line(custom_id: str | None, code: str, message: str, line: int | None = None) -> dict[str, Any]:
    """A line that never became a request (unparseable, duplicate, wrong url, cancelled...)."""
    err: dict[str, Any] = {"code": code, "message": message}
    if line is not None:
        err["line"] = line
    return {"id": line_id(), "custom_id": custom_id, "response": None, "error": err}


def response_line(custom_id: str | None, status: int, request_id: str, body: dict[str, Any]) -> dict[str, Any]:
    """A line that got an HTTP-style answer: the completion (200) or an API error body."""
    return {"id": line_id(), "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def api_error_line(custom_id: str | None, request_id: str, exc: APIError) -> dict[str, Any]:
    return response_line(custom_id, exc.status, request_id, exc.body())


def _validation_reason(exc: ValidationError) -> tuple[str, str | None]:
    first = exc.errors()[0] if exc.errors() else {}
    loc = ".".join(str(p) for p in first.get("loc", ())) or None
    msg = first.get("msg", "invalid value")
    return (f"Invalid value for '{loc}': {msg}." if loc else f"Invalid request body: {msg}."), loc


def parse_body(kind: str, body: Any) -> dict[str, Any]:
    """Validate one request body; returns the wire fields of its GenerateRequest or raises APIError."""
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_request", param="body")
    model_cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        message, param = _validation_reason(exc)
        raise APIError(400, message, code="invalid_request", param=param) from None
    req.check_supported()
    if req.stream:
        raise APIError(400, "Batch requests cannot be streamed; remove 'stream'.", code="invalid_request",
                       param="stream")
    fields: dict[str, Any] = {"model": req.model, "kind": kind,
                              "sampling": req.sampling().model_dump(mode="json", exclude_none=True)}
    if isinstance(req, ChatCompletionRequest):
        fields["messages"] = [m.model_dump(mode="json", exclude_none=True) for m in req.wire_messages()]
    else:
        fields["prompt"] = req.prompt_text
    return fields


@dataclass
class Parsed:
    # (line_no, custom_id, state, request fields or None, error result or None)
    lines: list[tuple[int, str | None, str, dict | None, dict | None]] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    @property
    def model(self) -> str | None:
        return next(iter(self.models)) if len(self.models) == 1 else None


def parse_file(path: Path, endpoint: str, max_lines: int) -> Parsed:
    """Read an input file; line numbers count from 1, blank lines are skipped."""
    kind = ENDPOINTS[endpoint]
    out = Parsed()
    seen: set[str] = set()
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise BatchFileError("file_not_found", "The input file was deleted before the batch was validated.") from None
    except UnicodeDecodeError:
        raise BatchFileError("invalid_file_format", "The input file is not UTF-8 text (JSONL expected).") from None
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(out.lines) >= max_lines:
            raise BatchFileError("too_many_requests", f"The input file has more than {max_lines} requests.", line_no)

        def bad(custom_id: str | None, code: str, message: str) -> None:
            out.lines.append((line_no, custom_id, "failed", None, error_line(custom_id, code, message, line_no)))

        try:
            item = json.loads(raw)
        except ValueError:
            bad(None, "invalid_json", f"Line {line_no} is not valid JSON.")
            continue
        if not isinstance(item, dict):
            bad(None, "invalid_request", f"Line {line_no} is not a JSON object.")
            continue
        custom_id = item.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            bad(None, "missing_custom_id", f"Line {line_no} has no 'custom_id' (a non-empty string is required).")
            continue
        if custom_id in seen:
            bad(custom_id, "duplicate_custom_id",
                f"Line {line_no} repeats custom_id '{custom_id}'; custom_id must be unique within a batch.")
            continue
        seen.add(custom_id)
        method = item.get("method", "POST")
        if method != "POST":
            bad(custom_id, "invalid_method", f"Line {line_no}: method must be 'POST', not {method!r}.")
            continue
        url = item.get("url")
        if url != endpoint:
            bad(custom_id, "invalid_url",
                f"Line {line_no}: url {url!r} does not match the batch's endpoint '{endpoint}'.")
            continue
        try:
            fields = parse_body(kind, item.get("body"))
        except APIError as exc:
            out.lines.append((line_no, custom_id, "failed", None, api_error_line(custom_id, "", exc)))
            continue
        out.models.add(fields["model"])
        out.lines.append((line_no, custom_id, "pending", fields, None))
    if not out.lines:
        raise BatchFileError("empty_file", "The input file contains no requests.")
    return out
