"""OpenAI request bodies the gateway accepts, validated before anything reaches the broker.

Parameters the service cannot honour (tools, response formats, logit bias, several prompts in
one completion request) are refused with a 400 that names them, never silently ignored.
"""

from __future__ import annotations

from typing import Annotated, Literal

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
            ignore_eos=self.ignore_eos,
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
        self._refuse_unsupported(("tools", "functions", "tool_choice", "function_call", "logit_bias",
                                  "audio", "modalities", "prediction"))
        fmt = (self.model_extra or {}).get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise APIError(400, "Only response_format {'type': 'text'} is supported by this service.",
                           code="unsupported_parameter", param="response_format")

    def sampling(self) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._sampling(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)

    def wire_messages(self) -> list[ChatMessage]:
        return [m.to_wire() for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str]
    max_tokens: MaxTokens | None = 16  # the OpenAI default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("exactly one prompt per request is supported (send one request per prompt)")
        return v

    def check_supported(self) -> None:
        self._refuse_unsupported(("suffix", "logit_bias"))
        best_of = (self.model_extra or {}).get("best_of")
        if best_of not in (None, self.n):
            raise APIError(400, "best_of is not supported (use n).", code="unsupported_parameter", param="best_of")

    @property
    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def sampling(self) -> SamplingParams:
        return self._sampling(self.max_tokens, self.logprobs, self.echo)
