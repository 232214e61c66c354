"""A synthetic token source: a LOAD-TEST TOOL, never the default and never used by serving tests.

``chatai worker --engine synthetic`` serves any request without a model: every ``step_ms`` one
"engine step" gives each running request ``tokens_per_step`` tokens of filler text, the way a real
engine's batch step gives every sequence one token. With no model in the way it finds how many
tokens per second and how many concurrent streams the rest of the path (reply frames, broker,
tunnel, gateway, SSE) can relay: ``chatai bench relay`` uses it. Its text is meaningless and its
token counts are what it was asked for, so nothing a user sees should ever come from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from broker_config.messages import GenerateRequest
from gpu_worker.engine import ChoiceDelta, RequestFailed, Step
from gpu_worker.settings import WorkerSettings

FILLER = " tok"


class SyntheticEngine:
    """Same interface as ``gpu_worker.engine.Engine``; one shared step clock for all requests."""

    def __init__(self, max_num_seqs: int, step_ms: float, tokens_per_step: int, max_model_len: int = 1 << 20) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self._step = step_ms / 1000.0
        self._tokens_per_step = tokens_per_step
        self._tick = asyncio.Event()
        self._clock: asyncio.Task | None = None
        self._aborted: set[str] = set()
        self._running = 0

    @classmethod
    def start(cls, settings: WorkerSettings) -> "SyntheticEngine":
        return cls(settings.max_num_seqs or 4096, settings.synthetic_step_ms, settings.synthetic_tokens_per_step)

    def shutdown(self) -> None:
        if self._clock is not None:
            self._clock.cancel()

    async def _run_clock(self) -> None:
        """One step for everybody: wake every waiting request, then start a fresh step."""
        while True:
            await asyncio.sleep(self._step)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    async def generate(self, req: GenerateRequest) -> AsyncIterator[Step]:
        if req.sampling.max_tokens is None:
            raise RequestFailed(400, "invalid_request_error", "the synthetic engine needs max_tokens")
        if self._clock is None:
            self._clock = asyncio.create_task(self._run_clock(), name="synthetic-engine-clock")
        n, left = req.choice_count, req.sampling.max_tokens
        self._running += 1
        try:
            while left > 0:
                await self._tick.wait()
                if req.request_id in self._aborted:
                    self._aborted.discard(req.request_id)
                    yield Step(prompt_tokens=1, finished=True,
                               choices=[ChoiceDelta(index=i, text="", tokens=0, finish_reason="abort") for i in range(n)])
                    return
                k = min(left, self._tokens_per_step)
                left -= k
                done = left == 0
                yield Step(prompt_tokens=1, finished=done,
                           choices=[ChoiceDelta(index=i, text=FILLER * k, tokens=k,
                                                finish_reason="length" if done else None) for i in range(n)])
        finally:
            self._running -= 1

    async def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
