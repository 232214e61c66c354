"""Wire schemas: every message that crosses the broker, imported by both sides.

A request carries an OpenAI API body as the client sent it (``ApiRequest``); the worker answers
it with vLLM's own OpenAI layer and sends back what that layer produced, unchanged. Reply frames
form one stream per request: ``started`` (once per delivery attempt, as soon as a worker takes
it), then either ``final`` with the whole response (its status and JSON body), or ``head`` (the
status of a streamed response), any number of ``data`` (its server-sent events) and ``final``;
or ``error`` when the worker itself could not answer. ``final`` always carries the engine's
token counts. Every frame carries the request id, the attempt it belongs to and a sequence
number that restarts at 0 with each attempt, so a gateway can tell a redelivery from a duplicate.

A reply message to a gateway's own reply queue may carry several frames as a JSON array, in
order: consecutive frames of one request (``head`` with the first ``data``, the last ``data``
with ``final``), and frames of different requests of that gateway that a worker has ready at the
same moment (one engine step advances every running sequence). The gateway routes each frame by
its request id. One message instead of many saves the broker, the tunnel and the gateway their
per-message work, which is what limits a relay of many concurrent streams. Batch results stay
one frame per message: each is persistent and acked alone.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

WIRE_VERSION = 2  # 2: OpenAI bodies through, vLLM's responses back
CONTENT_TYPE = "application/json"


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=False)

    def encode(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()


# ---------------------------------------------------------------- requests (gateway -> worker)

# The OpenAI endpoints a worker answers through the queue, with vLLM's own OpenAI layer.
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings")
Endpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/embeddings"]


class ApiRequest(_Wire):
    """One OpenAI API request on a model queue: the body as the client sent it (after the
    gateway's checks), for vLLM's OpenAI layer on the worker to answer."""

    v: int = WIRE_VERSION
    request_id: str
    model: str  # the queue: the base model (a LoRA adapter's requests go to its base model's queue)
    endpoint: Endpoint
    body: dict[str, Any]
    stream: bool = False  # the body asks for server-sent events
    reply_to: str  # routing key on the replies exchange
    deadline: float | None = None  # unix time; a worker drops a request it receives later
    batch_id: str | None = None


# ---------------------------------------------------------------- replies (worker -> gateway)


class Usage(_Wire):
    """Tokens as the engine counted them (whether or not the client asked for usage)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Frame(_Wire):
    request_id: str
    attempt: int = 1
    seq: int = 0


class Started(_Frame):
    """A worker took the request (sent at once: the gateway's queue timeout ends here)."""

    type: Literal["started"] = "started"
    worker_id: str


class Head(_Frame):
    """A streamed response begins: its HTTP status and media type, as vLLM's layer set them."""

    type: Literal["head"] = "head"
    status: int = 200
    content_type: str = "text/event-stream"


class Data(_Frame):
    """A piece of a streamed response body (coalesced server-sent events), unchanged."""

    type: Literal["data"] = "data"
    data: str
    tokens: int = 0  # output tokens the engine produced since the previous Data frame


class Final(_Frame):
    """The request ended. A whole (not streamed) response travels here with its status."""

    type: Literal["final"] = "final"
    usage: Usage = Field(default_factory=Usage)
    status: int = 200
    content_type: str = CONTENT_TYPE
    body: str | None = None  # the whole response; None after a streamed one
    aborted: bool = False  # cancelled on the worker before it finished


class Error(_Frame):
    """The worker could not answer (not vLLM's own errors, which are responses with a status);
    code and status follow the OpenAI error format."""

    type: Literal["error"] = "error"
    status: int = 500
    code: str = "internal_error"
    message: str


Frame = Annotated[Union[Started, Head, Data, Final, Error], Field(discriminator="type")]
AnyFrame = Union[Started, Head, Data, Final, Error]
_frame_adapter: TypeAdapter[Frame] = TypeAdapter(Frame)


_frames_adapter: TypeAdapter[list[Frame]] = TypeAdapter(list[Frame])


def decode_frame(body: bytes) -> AnyFrame:
    return _frame_adapter.validate_json(body)


def decode_frames(body: bytes) -> list[AnyFrame]:
    """One frame, or a JSON array of frames (see the module's docstring); raises ValueError."""
    if body[:1] == b"[":
        return _frames_adapter.validate_json(body)
    return [_frame_adapter.validate_json(body)]


def decode_frames_leniently(body: bytes) -> tuple[list[AnyFrame], int]:
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
    frames: list[AnyFrame] = []
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
    adapters: list[str] = Field(default_factory=list)  # LoRA adapters served beside the model
    tasks: list[str] = Field(default_factory=list)  # vLLM's supported tasks: generate, embed, ...
    # Seconds from the worker's process start to "ready" (its model load): what a user of a cold
    # model waits for. Sent once ready; gateways and the autoscaler remember the last one per model.
    startup_seconds: float | None = None
    # The worker also consumes its own affinity queue (chatai.wk.<id>.affinity): a gateway may
    # send it the follow-up turns of conversations it served (docs/architecture.md).
    affinity: bool = False
    # vLLM's prefix cache since the engine started, in prompt tokens: looked up, and found cached.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    @property
    def has_room(self) -> bool:
        """Ready and not full, as of this heartbeat."""
        return self.state == "ready" and self.in_flight < self.capacity


# An autoscaler's heartbeat travels on the same workers exchange, told apart by the AMQP message
# ``type`` property (a worker's heartbeat has none): listeners of older versions skip it as malformed.
SCALER_MESSAGE_TYPE = "chatai.scaler"


class ScaledModel(_Wire):
    """One model an autoscaler brings back from zero on demand."""

    model: str
    max_workers: int
    pending: int = 0  # array tasks Slurm has not started yet
    running: int = 0  # array tasks running (loading their model, serving or draining)
    startup_seconds: float | None = None  # the last worker's measured start-up (see Heartbeat)


class ScalerHeartbeat(_Wire):
    """What a running ``chatai autoscale`` tells every gateway each round: which models it starts
    workers for when requests wait (so a cold model is worth waiting for), and how long a start took."""

    scaler_id: str
    models: list[ScaledModel]
    interval: float = 5.0  # a gateway forgets the autoscaler after a few missed intervals
    sent_at: float
