"""Turning an uploaded JSONL file into batch lines, line by line.

A bad line does not sink the batch: it becomes an error line (OpenAI's batch error format)
with its custom_id, when it has one, and a reason; every other line runs. Only a file that
cannot be a batch at all (not UTF-8 text, no request line, too many lines) fails the batch.
Lines are parsed with limits (length, JSON nesting depth), so no line can exhaust memory or
the stack of the gateway that validates it.

Bodies go through the same checks as interactive requests (``gateway.schemas.check_body``), so
a batch line is accepted by the gateway exactly when the same body sent to the endpoint would be;
the worker's vLLM layer then answers it (or refuses it, in the line's response) as it answers
that request.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from pydantic_core import from_json

from gateway.cluster.errors import ClusterError
from gateway.errors import APIError, to_api_error
from gateway.schemas import RequestCaps, check_body, json_values


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


def api_error_line(custom_id: str | None, request_id: str, exc: APIError | ClusterError) -> dict[str, Any]:
    """A line that failed the way an interactive request would (same status and error body)."""
    error = to_api_error(exc)
    return response_line(custom_id, error.status, request_id, error.body())


def parse_body(endpoint: str, body: Any, caps: RequestCaps | None = None) -> dict[str, Any]:
    """Check one request body; returns what its line stores (model, endpoint, body) or raises APIError."""
    routed = check_body(endpoint, body, batch=True, caps=caps)
    return {"model": routed.model, "endpoint": endpoint, "body": routed.body}


@dataclass
class Parsed:
    # (line_no, custom_id, state, request fields or None, error result or None)
    lines: list[tuple[int, str | None, str, dict | None, dict | None]] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    @property
    def model(self) -> str | None:
        return next(iter(self.models)) if len(self.models) == 1 else None


def _lines(f: BinaryIO, max_line_bytes: int) -> Iterator[bytes | None]:
    """The file's lines (split on ``\n`` only, as JSONL is), each read with a cap: a longer line
    is skipped to its end without being held in memory and comes out as None."""
    while raw := f.readline(max_line_bytes + 1):
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                pass
            yield None
            continue
        yield raw


def _load(raw: str, line_no: int) -> Any:
    """One line's JSON, or an error message. jiter (pydantic-core) refuses nesting deeper than
    ~200 levels with a ValueError; the standard library would recurse until RecursionError."""
    try:
        return from_json(raw)
    except ValueError as exc:
        if "recursion limit" in str(exc):
            raise ValueError(f"Line {line_no} is nested too deeply to be a request.") from None
        raise ValueError(f"Line {line_no} is not valid JSON.") from None


def parse_file(path: Path, endpoint: str, max_lines: int, max_line_bytes: int = 4 * 1024 * 1024,
               caps: RequestCaps | None = None) -> Parsed:
    """Read an input file; line numbers count from 1, blank lines are skipped.

    Memory stays bounded by the line cap whatever the file holds; a line that cannot be read
    becomes an error line, never an exception that escapes.
    """
    out = Parsed()
    seen: set[str] = set()
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise BatchFileError("file_not_found", "The input file was deleted before the batch was validated.") from None
    with f:
        for line_no, raw_bytes in enumerate(_lines(f, max_line_bytes), start=1):
            _parse_line(out, seen, endpoint, line_no, raw_bytes, max_lines, max_line_bytes, caps)
    if not out.lines:
        raise BatchFileError("empty_file", "The input file contains no requests.")
    return out


def _parse_line(out: Parsed, seen: set[str], endpoint: str, line_no: int, raw_bytes: bytes | None,
                max_lines: int, max_line_bytes: int, caps: RequestCaps | None = None) -> None:
    """Add one line to ``out``: a pending request or an error line."""
    if raw_bytes is not None and not raw_bytes.strip():
        return
    if len(out.lines) >= max_lines:
        raise BatchFileError("too_many_requests", f"The input file has more than {max_lines} requests.", line_no)

    def bad(custom_id: str | None, code: str, message: str) -> None:
        out.lines.append((line_no, custom_id, "failed", None, error_line(custom_id, code, message, line_no)))

    if raw_bytes is None:
        return bad(None, "line_too_long", f"Line {line_no} is longer than {max_line_bytes} bytes.")
    try:
        raw = raw_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise BatchFileError("invalid_file_format", "The input file is not UTF-8 text (JSONL expected).",
                             line_no) from None
    if caps is not None and json_values(raw_bytes, caps.max_json_values) > caps.max_json_values:
        return bad(None, "too_many_values", f"Line {line_no} holds more than {caps.max_json_values} JSON values: "
                   "more than the longest context a model here serves.")
    try:
        item = _load(raw, line_no)
    except ValueError as exc:
        return bad(None, "invalid_json", str(exc))
    if not isinstance(item, dict):
        return bad(None, "invalid_request", f"Line {line_no} is not a JSON object.")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return bad(None, "missing_custom_id", f"Line {line_no} has no 'custom_id' (a non-empty string is required).")
    if custom_id in seen:
        return bad(custom_id, "duplicate_custom_id",
                   f"Line {line_no} repeats custom_id '{custom_id}'; custom_id must be unique within a batch.")
    seen.add(custom_id)
    method = item.get("method", "POST")
    if method != "POST":
        return bad(custom_id, "invalid_method", f"Line {line_no}: method must be 'POST', not {method!r}.")
    url = item.get("url")
    if url != endpoint:
        return bad(custom_id, "invalid_url",
                   f"Line {line_no}: url {url!r} does not match the batch's endpoint '{endpoint}'.")
    try:
        fields = parse_body(endpoint, item.get("body"), caps)
    except APIError as exc:
        out.lines.append((line_no, custom_id, "failed", None, api_error_line(custom_id, "", exc)))
        return
    out.models.add(fields["model"])
    out.lines.append((line_no, custom_id, "pending", fields, None))
