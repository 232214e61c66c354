"""Wire schemas: every message that crosses the broker, imported by both sides.

Messages are JSON bodies (``application/json``). Reply frames form one stream per request:
``started`` (once per delivery attempt), any number of ``delta``, then ``final`` or ``error``.
Every frame carries the request id, the attempt it belongs to and a sequence number that
restarts at 0 with each attempt, so a gateway can tell a redelivery from a duplicate.

A reply message to a gateway's own reply queue may carry several frames as a JSON array, in
order: consecutive frames of one request (``started`` with the first delta, the last delta with
``final``), and frames of different requests of that gateway that a worker has ready at the same
moment (one engine step advances every running sequence). The gateway routes each frame by its
request id. One message instead of many saves the broker, the tunnel and the gateway their
per-message work, which is what limits a relay of many concurrent streams. Batch results stay
one frame per message: each is persistent and acked alone.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_VERSION = 1
CONTENT_TYPE = "application/json"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# ---------------------------------------------------------------- requests (gateway -> worker)


class ChatMessage(_Wire):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str = ""
    name: str | None = None


class SamplingParams(_Wire):
    """OpenAI sampling options, already validated and defaulted by the gateway."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None  # None: up to the model's context length
    min_tokens: int = 0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # number of top alternatives per token; None = no logprobs
    prompt_logprobs: bool = False  # completions with echo: logprobs of the prompt tokens as well
    echo: bool = False  # completions: prepend the prompt to the text
    logit_bias: dict[int, float] | None = None  # token id -> bias added to its logit (-100..100)
    ignore_eos: bool = False  # vLLM extension, handy for load tests


class GenerateRequest(_Wire):
    """One generation job on a model queue."""

    v: int = WIRE_VERSION
    request_id: str
    model: str
    kind: Literal["chat", "completion"]
    messages: list[ChatMessage] | None = None  # kind == "chat"
    prompt: str | None = None  # kind == "completion": one text prompt
    # kind == "completion", instead of ``prompt``: token ids, or several prompts. Choice i of
    # prompt p has index p * n + i in the replies, as in OpenAI's API.
    prompts: list[str | list[int]] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    stream: bool = False  # False: the worker sends no deltas, only the final frame with the text
    reply_to: str  # routing key on the replies exchange
    deadline: float | None = None  # unix time; a worker drops a request it receives later
    batch_id: str | None = None

    def prompt_list(self) -> list[str | list[int]]:
        """The completion prompts, each a text or token ids (empty for chat)."""
        if self.prompts is not None:
            return list(self.prompts)
        return [self.prompt] if self.prompt is not None else []

    @property
    def choice_count(self) -> int:
        """Choices in the reply: n per prompt."""
        return self.sampling.n * max(1, len(self.prompt_list()))


# ---------------------------------------------------------------- replies (worker -> gateway)


class TopLogprob(_Wire):
    token: str
    logprob: float


class TokenLogprob(_Wire):
    token: str
    # None only for a prompt's first token, which has no context. A default, since frames are
    # encoded without None fields: a required field would make that frame undecodable.
    logprob: float | None = None
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class Usage(_Wire):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Frame(_Wire):
    request_id: str
    attempt: int = 1
    seq: int = 0


class Started(_Frame):
    type: Literal["started"] = "started"
    worker_id: str
    prompt_tokens: int = 0


class Delta(_Frame):
    """Coalesced new text of one choice: several tokens per message under load."""

    type: Literal["delta"] = "delta"
    index: int = 0
    text: str
    tokens: int
    logprobs: list[TokenLogprob] | None = None
    # Echo with logprobs: the prompt's tokens, in the choice's first delta only.
    prompt_logprobs: list[TokenLogprob] | None = None


class ChoiceEnd(_Wire):
    index: int
    finish_reason: Literal["stop", "length", "abort"] | None
    text: str | None = None  # whole text, only for non-streamed requests
    logprobs: list[TokenLogprob] | None = None  # only for non-streamed requests
    prompt_logprobs: list[TokenLogprob] | None = None  # echo with logprobs, non-streamed requests
    stop_reason: str | int | None = None


class Final(_Frame):
    type: Literal["final"] = "final"
    choices: list[ChoiceEnd]
    usage: Usage


class Error(_Frame):
    """The request failed on the worker; code and status follow the OpenAI error format."""

    type: Literal["error"] = "error"
    status: int = 500
    code: str = "internal_error"
    message: str


Frame = Annotated[Union[Started, Delta, Final, Error], Field(discriminator="type")]
_frame_adapter: TypeAdapter[Frame] = TypeAdapter(Frame)


_frames_adapter: TypeAdapter[list[Frame]] = TypeAdapter(list[Frame])


def decode_frame(body: bytes) -> Started | Delta | Final | Error:
    return _frame_adapter.validate_json(body)


def decode_frames(body: bytes) -> list[Started | Delta | Final | Error]:
    """One frame, or a JSON array of frames (see the module's docstring); raises ValueError."""
    if body[:1] == b"[":
        return _frames_adapter.validate_json(body)
    return [_frame_adapter.validate_json(body)]


def decode_frames_leniently(body: bytes) -> tuple[list[Started | Delta | Final | Error], int]:
    """The valid frames of a message and how many were not: one bad frame of a bundle (several
    requests' frames, see the module's docstring) must not take the other requests' frames with it."""
    try:
        return decode_frames(body), 0
    except ValueError:
        pass
    try:
        items = json.loads(body)
    except ValueError:
        return [], 1
    if not isinstance(items, list):
        return [], 1
    frames: list[Started | Delta | Final | Error] = []
    for item in items:
        try:
            frames.append(_frame_adapter.validate_python(item))
        except ValueError:
            continue
    return frames, len(items) - len(frames)


def encode_frames(frames: list[_Frame]) -> bytes:
    """One frame as itself, several as a JSON array, in order."""
    if len(frames) == 1:
        return frames[0].encode()
    return b"[" + b",".join(f.encode() for f in frames) + b"]"


# ---------------------------------------------------------------- control and heartbeats


class Cancel(_Wire):
    """Abort a request wherever it runs (client gone, batch cancelled)."""

    type: Literal["cancel"] = "cancel"
    request_id: str
    reason: str = "cancelled"


class Heartbeat(_Wire):
    """What a worker tells every gateway, every few seconds and on each state change."""

    worker_id: str
    model: str
    state: Literal["starting", "ready", "draining", "stopped"]
    capacity: int
    in_flight: int
    node: str
    slurm_job_id: str | None = None
    max_model_len: int | None = None
    interval: float = 5.0  # the gateway forgets a worker after a few missed intervals
    sent_at: float
    job_end_at: float | None = None  # unix time the Slurm job ends, when known
