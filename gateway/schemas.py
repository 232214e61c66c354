"""What the gateway checks of an OpenAI request body before it goes to a worker: little.

The worker answers with vLLM's own OpenAI layer, which validates every field as vLLM's server
does and stays in step with vLLM as it grows. The gateway keeps only what it needs to route,
limit and protect: the model (a routing key), ``stream``, ``n``, what one request may ask of a
GPU and of the gateway itself (``RequestCaps``: prompts and message lists no longer than the
model's context, output tokens and logprobs per request, JSON values per body, counted before
the body is parsed), and the rules that hold for this deployment and not for a vLLM server:

- no remote media: GPU nodes have no internet, so an image (or audio, video, file) given by URL
  is refused here with a 400; ``data:`` URLs travel with the request;
- the Responses API is stateless: ``store``, ``previous_response_id`` and ``background`` need
  storage the gateway does not keep, and are refused with a 400 rather than silently ignored.

Every other field goes through untouched, known to this gateway or not: vLLM decides. Batch
lines go through the same checks (``gateway.batches.validation``), so a batch line is accepted
exactly when the same body sent to the endpoint would be.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
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
class RequestCaps:
    """What one request may ask, as of now: the served models' contexts (from the workers'
    heartbeats) and the per-request budgets of ``GatewaySettings``. Built on the event loop and
    immutable, so batch validation may read it from a thread."""

    contexts: Mapping[str, int] = field(default_factory=dict)  # model (or adapter) -> max_model_len
    fallback_context: int = 131_072  # a model no worker has announced yet
    max_output_tokens: int = 32_768  # choices x max tokens per choice
    max_top_logprobs: int = 20  # top_logprobs / logprobs / prompt_logprobs
    max_logprob_tokens: int = 65_536  # choices x max tokens x (1 + top_logprobs), when logprobs are asked
    min_json_values: int = 16_384  # the JSON value cap is 4 x the longest context, at least this

    def context(self, model: str) -> int:
        return self.contexts.get(model) or self.fallback_context

    @property
    def max_json_values(self) -> int:
        """Array items and object members a body may hold: enough for a token-id prompt or a
        message list as long as the longest context (a message is ~2 commas), no more."""
        longest = max(self.contexts.values(), default=self.fallback_context)
        return max(self.min_json_values, 4 * longest)


@dataclass(frozen=True)
class Routed:
    """A checked request body and what the gateway needs of it."""

    endpoint: str
    body: dict[str, Any]
    model: str
    stream: bool
    include_usage: bool
    choices: int = 1  # sequences the worker generates (n x prompts); what rpm counts


_STRINGS = re.compile(rb'"[^"]*"')  # linear: run on text whose escaped quotes were removed


def json_values(raw: bytes, cap: int) -> int:
    """How many values (array items, object members) ``raw`` holds, in C-speed passes over the
    bytes and without parsing: its commas (values are at most commas + nesting depth + 1, and
    the parser refuses nesting past ~200 levels itself, with its own message). The first count
    includes commas inside strings; only when it passes ``cap`` are strings taken out (escaped
    backslashes and quotes first, so no string can hide a delimiter) and the count redone."""
    rough = raw.count(b",")
    if rough <= cap:
        return rough
    return _STRINGS.sub(b"", raw.replace(b"\\\\", b"").replace(b'\\"', b"")).count(b",")


def parse_json(raw: bytes, max_values: int | None = None) -> Any:
    """JSON with a nesting limit (jiter refuses ~200 levels with a ValueError, where the standard
    library would recurse until RecursionError) and, before parsing, a cap on its values: a 4 MB
    body of token ids is two million Python objects (~70 MB), refused here in milliseconds."""
    if max_values is not None and json_values(raw, max_values) > max_values:
        raise _bad(f"The request body holds more than {max_values} JSON values (array items and object "
                   "members): more than the longest context a model here serves.", code="too_many_values")
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


def _prompts(value: Any) -> list[Any]:
    """A completions ``prompt`` / embeddings ``input`` as its list of prompts: a text, a token-id
    list, or a list of either."""
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        return value
    return [value]


def _too_long(param: str, length: int, context: int, what: str) -> APIError:
    return _bad(f"{what} has {length} items, more than the model's context of {context} tokens.", param,
                code="context_length_exceeded")


def _check_context(endpoint: str, body: dict[str, Any], context: int) -> int:
    """Refuse token-id prompts and message lists longer than the context (every item is at least a
    token), before a worker spends anything on them; returns the number of prompts."""
    if endpoint == "/v1/chat/completions":
        messages = body.get("messages")
        if isinstance(messages, list) and len(messages) > context:
            raise _too_long("messages", len(messages), context, "'messages'")
        return 1
    if endpoint == "/v1/responses":
        items = body.get("input")
        if isinstance(items, list) and len(items) > context:
            raise _too_long("input", len(items), context, "'input'")
        return 1
    param = "prompt" if endpoint == "/v1/completions" else "input"
    prompts = _prompts(body.get(param))
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, list) and len(prompt) > context:
            raise _too_long(param, len(prompt), context, f"'{param}'" + (f"[{i}]" if len(prompts) > 1 else ""))
    return len(prompts)


def _int(value: Any) -> int | None:
    """An integer as vLLM's pydantic (lax mode) reads it: ``2000``, ``2000.0`` and ``"2000"`` alike,
    so no spelling slips past a budget; None for what vLLM refuses anyway (a bool, ``2.5``, text)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


# Per endpoint: the fields that bound one choice's output tokens, in vLLM's order of precedence,
# and vLLM's default when none is given (None: up to the context).
_OUTPUT_FIELDS = {"/v1/chat/completions": (("max_completion_tokens", "max_tokens"), None),
                  "/v1/completions": (("max_tokens",), 16),
                  "/v1/responses": (("max_output_tokens",), None)}


def _check_budgets(endpoint: str, body: dict[str, Any], choices: int, context: int, caps: RequestCaps) -> None:
    """``choices x max tokens`` and logprobs within the per-request budgets. A request that sets no
    bound gets one (the budget's share per choice, at most the context), so it cannot run to the
    context on every choice; vLLM clamps it to what the prompt leaves anyway."""
    if endpoint not in _OUTPUT_FIELDS:
        return
    names, default = _OUTPUT_FIELDS[endpoint]
    param = next((name for name in names if body.get(name) is not None), None)
    if param is not None:
        per_choice = _int(body[param])
        if per_choice is None:
            return
        per_choice = max(1, per_choice)
    elif default is not None and all(name not in body for name in names):  # an explicit null is unbounded
        param, per_choice = names[0], default
    else:
        param, per_choice = names[0], min(context, caps.max_output_tokens // choices)
        if per_choice < 1:
            raise _bad(f"{choices} choices are more than this service's output budget of "
                       f"{caps.max_output_tokens} tokens per request allows.", "n", code="output_budget_exceeded")
        body[param] = per_choice
    tokens = choices * per_choice
    if tokens > caps.max_output_tokens:
        raise _bad(f"{choices} choice(s) x {param} {per_choice} = {tokens} output tokens, more than this "
                   f"service's budget of {caps.max_output_tokens} per request. Ask for fewer tokens or "
                   "choices, or use the batch API for many requests.", param, code="output_budget_exceeded")
    _check_logprobs(endpoint, body, tokens, caps)


def _check_logprobs(endpoint: str, body: dict[str, Any], tokens: int, caps: RequestCaps) -> None:
    """Each logprob entry is ~100 bytes of response: cap the alternatives per token and the entries
    per request (output tokens x (1 + alternatives))."""
    if endpoint == "/v1/completions":
        top_param, top, asked = "logprobs", _int(body.get("logprobs")), body.get("logprobs") is not None
    else:
        top_param, top = "top_logprobs", _int(body.get("top_logprobs"))
        asked = bool(body.get("logprobs")) if endpoint == "/v1/chat/completions" else bool(top)
    for param, value in ((top_param, top), ("prompt_logprobs", _int(body.get("prompt_logprobs")))):
        if value is not None and not 0 <= value <= caps.max_top_logprobs:
            raise _bad(f"'{param}' must be from 0 to {caps.max_top_logprobs} on this service.", param,
                       code="logprobs_budget_exceeded")
    if asked:
        entries = tokens * (1 + (top or 0))
        if entries > caps.max_logprob_tokens:
            raise _bad(f"Logprobs for {tokens} output tokens x (1 + {top or 0} alternatives) = {entries} entries, "
                       f"more than this service's budget of {caps.max_logprob_tokens} per request. Ask for fewer "
                       "tokens, choices or alternatives.", top_param, code="logprobs_budget_exceeded")


def check_body(endpoint: str, body: Any, batch: bool = False, caps: RequestCaps | None = None) -> Routed:
    """The gateway's checks of one request body (an API call's or a batch line's); APIError 400.

    With ``caps``, also the context and the per-request budgets (and the output bound a request
    that sets none gets, written into the body)."""
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
    choices = 1
    if caps is not None:
        context = caps.context(model)
        choices = _check_context(endpoint, body, context) * (n or 1)
        _check_budgets(endpoint, body, choices, context, caps)
        if endpoint == "/v1/embeddings":
            choices = 1  # one request, however many inputs: rpm counts generations
    options = body.get("stream_options")
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return Routed(endpoint, body, model, stream, include_usage, choices)
