"""The engine's own token counts for each request, whatever endpoint and options it used.

The gateway charges ``tpm`` limits and counts tokens in its metrics from the final frame's
usage, whether or not the client asked for usage in its stream. vLLM's OpenAI layer computes
usage only into the response it writes; rather than parse every response, the worker wraps the
engine client that layer calls and counts what the engine produces: the prompt's tokens and
each choice's output tokens, for every engine request a handler starts (several for a
multi-prompt completion, one per choice group). The request being served is found through a
context variable: vLLM's handler runs in the task that the worker started for the request, or
in tasks it creates, which inherit the variable.
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from broker_config.messages import Usage

_current: ContextVar["TokenCount | None"] = ContextVar("chatai_token_count", default=None)


@dataclass
class TokenCount:
    """Tokens of one API request, summed over its engine requests."""

    prompt: dict[str, int] = field(default_factory=dict)  # engine request id -> prompt tokens
    output: dict[tuple[str, int], int] = field(default_factory=dict)  # (engine request, choice) -> tokens
    first_token_at: float | None = None

    def watch(self) -> object:
        """Make this the count of the requests the current task (and its children) start."""
        return _current.set(self)

    @staticmethod
    def unwatch(token: object) -> None:
        _current.reset(token)  # type: ignore[arg-type]

    @property
    def completion_tokens(self) -> int:
        return sum(self.output.values())

    def usage(self) -> Usage:
        prompt = sum(self.prompt.values())
        completion = self.completion_tokens
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def add_prompt(self, out: Any) -> None:
        """The prompt of an engine output (``RequestOutput`` or ``PoolingRequestOutput``)."""
        if out.request_id not in self.prompt and getattr(out, "prompt_token_ids", None) is not None:
            self.prompt[out.request_id] = len(out.prompt_token_ids)

    def add(self, out: Any, delta: bool) -> None:
        """One generation output (``RequestOutput``): its prompt and each choice's tokens."""
        self.add_prompt(out)
        rid = out.request_id
        for choice in out.outputs or ():
            ids = getattr(choice, "token_ids", None)
            if ids is None:
                continue  # a pooling output: no generated tokens
            key = (rid, getattr(choice, "index", 0))
            self.output[key] = self.output.get(key, 0) + len(ids) if delta else len(ids)
            if ids and self.first_token_at is None:
                self.first_token_at = time.monotonic()


class CountingEngineClient:
    """vLLM's engine client with every generation and pooling request counted (see above).

    Everything else is the engine's own: attributes pass straight through."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    async def generate(self, prompt: Any, sampling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        from vllm.sampling_params import RequestOutputKind

        count = _current.get()
        delta = getattr(sampling_params, "output_kind", None) == RequestOutputKind.DELTA
        outputs = self._engine.generate(prompt, sampling_params, request_id, *args, **kwargs)
        try:
            async for out in outputs:
                if count is not None:
                    count.add(out, delta)
                yield out
        finally:
            await outputs.aclose()  # an early exit aborts the engine request at once

    async def encode(self, prompt: Any, pooling_params: Any, request_id: str, *args: Any, **kwargs: Any):
        count = _current.get()
        outputs = self._engine.encode(prompt, pooling_params, request_id, *args, **kwargs)
        try:
            async for out in outputs:
                if count is not None:
                    count.add_prompt(out)  # pooling: no generated tokens
                yield out
        finally:
            await outputs.aclose()
