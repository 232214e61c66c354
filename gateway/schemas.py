"""OpenAI request bodies the gateway accepts, validated before anything reaches the broker.

Parameters the service cannot honour (tools, response formats other than text, suffix, best_of)
are refused with a 400 that names them, never silently ignored. Batch lines go through the same
models (``gateway.batches.validation``), so both paths accept and refuse the same bodies.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker_config.messages import ChatMessage, SamplingParams
from gateway.errors import APIError

# A model name is an AMQP routing key and part of its queue's name, both at most 255 bytes.
MAX_MODEL_NAME_BYTES = 200


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    def _refuse_unsupported(self, names: tuple[str, ...]) -> None:
        for name in names:
            value = (self.model_extra or {}).get(name)
            if value not in (None, [], {}, False):
                raise APIError(400, f"The parameter '{name}' is not supported by this service.",
                               code="unsupported_parameter", param=name)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class InMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def to_wire(self) -> ChatMessage:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        return ChatMessage(role=self.role, content=content or "", name=self.name)


class StreamOptions(BaseModel):
    include_usage: bool = False


Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
N = Annotated[int, Field(ge=1, le=16)]
MaxTokens = Annotated[int, Field(ge=1)]

# Limits of one request (the worker runs every choice of every prompt at once).
MAX_LOGIT_BIAS = 300  # entries in logit_bias
MAX_PROMPTS = 64  # prompts in one completions request
MAX_CHOICES = 128  # prompts x n
MAX_TOKEN_ID = 2**31 - 1  # beyond any vocabulary; the worker checks the model's own size


def _logit_bias(bias: dict[str, float] | None) -> dict[str, float] | None:
    """OpenAI's rule: token ids (as strings) to a bias from -100 to 100."""
    if bias is None:
        return None
    if len(bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit()) or int(key) > MAX_TOKEN_ID:
            raise ValueError(f"keys must be token ids (non-negative integers as strings), not {key[:40]!r}")
        if not (math.isfinite(value) and -100.0 <= value <= 100.0):
            raise ValueError(f"the bias of token {key} must be between -100 and 100")
    return bias


def _token_ids(ids: list[Any], what: str) -> None:
    if not ids:
        raise ValueError(f"{what} must not be empty")
    for i in ids:
        if type(i) is not int or not 0 <= i <= MAX_TOKEN_ID:
            raise ValueError(f"{what} must hold token ids (non-negative integers), not {str(i)[:40]!r}")


def _check_prompt(prompt: Any) -> Any:
    """A text, a list of texts, a list of token ids, or a list of token-id lists (OpenAI's forms)."""
    if isinstance(prompt, str):
        return prompt
    if not isinstance(prompt, list) or not prompt:
        raise ValueError("the prompt must be a string, a list of strings, a list of token ids or a list of "
                         "token-id lists, and not empty")
    if all(type(p) is int for p in prompt):
        _token_ids(prompt, "a token-id prompt")
        return prompt
    if len(prompt) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request (send several requests, or a batch)")
    if all(isinstance(p, list) for p in prompt):
        for p in prompt:
            _token_ids(p, "each token-id prompt")
    elif not all(isinstance(p, str) for p in prompt):
        raise ValueError("a list of prompts must hold only strings or only lists of token ids")
    return prompt


def _stop_list(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("up to 4 non-empty stop sequences")
    return stops


class _Sampling(_Body):
    model: str = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: N = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM extension
    min_tokens: Annotated[int, Field(ge=0)] = 0  # vLLM extension
    logit_bias: dict[str, float] | None = None

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str) -> str:
        if len(v.encode()) > MAX_MODEL_NAME_BYTES:
            raise ValueError(f"model names are at most {MAX_MODEL_NAME_BYTES} bytes long")
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        _stop_list(v)
        return v

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return _logit_bias(v)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_Sampling":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def _sampling(self, max_tokens: int | None, logprobs: int | None, echo: bool = False) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            stop=_stop_list(self.stop),
            seed=self.seed,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=logprobs,
            echo=echo,
            prompt_logprobs=echo and logprobs is not None,
            ignore_eos=self.ignore_eos,
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[InMessage] = Field(min_length=1)
    max_tokens: MaxTokens | None = None
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def check_supported(self) -> None:
        self._refuse_unsupported(("tools", "functions", "tool_choice", "function_call",
                                  "audio", "modalities", "prediction"))
        fmt = (self.model_extra or {}).get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise APIError(400, "Only response_format {'type': 'text'} is supported by this service.",
                           code="unsupported_parameter", param="response_format")

    def sampling(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def wire_fields(self) -> dict[str, Any]:
        """The GenerateRequest fields that carry the input, JSON-ready (batch lines store them)."""
        return {"messages": [m.to_wire().model_dump(mode="json", exclude_none=True) for m in self.messages]}


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: MaxTokens | None = 16  # the OpenAI default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        return _check_prompt(v)

    @model_validator(mode="after")
    def _check_choices(self) -> "CompletionRequest":
        if self.prompt_count * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n is at most {MAX_CHOICES} per request (send several requests, or a batch)")
        return self

    def check_supported(self) -> None:
        self._refuse_unsupported(("suffix",))
        best_of = (self.model_extra or {}).get("best_of")
        if best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported (use n).", code="unsupported_parameter", param="best_of")

    @property
    def prompt_list(self) -> list[str | list[int]]:
        """One entry per prompt: a text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]

    @property
    def prompt_count(self) -> int:
        return len(self.prompt_list)

    def wire_fields(self) -> dict[str, Any]:
        """One text prompt travels as ``prompt``; token ids and several prompts as ``prompts``."""
        prompts = self.prompt_list
        if len(prompts) == 1 and isinstance(prompts[0], str):
            return {"prompt": prompts[0]}
        return {"prompts": prompts}

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs, self.echo)
