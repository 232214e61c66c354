"""A synthetic token source: a LOAD-TEST TOOL, never the default and never used by serving tests.

``chatai worker --engine synthetic`` serves any request without a model: every ``step_ms`` one
"engine step" gives each running request ``tokens_per_step`` tokens of filler text, the way a real
engine's batch step gives every sequence one token. With no model in the way it finds how many
tokens per second and how many concurrent streams the rest of the path (reply frames, broker,
tunnel, gateway, SSE) can relay: ``chatai bench relay`` uses it. Its text is meaningless and its
token counts are what it was asked for, so nothing a user sees should ever come from it. It writes
OpenAI-shaped chat and completion responses (streamed or whole) so that the gateway relays them
as it relays vLLM's; other endpoints get a 400.
"""

from __future__ import annotations

import asyncio
import json
import time

from broker_config.messages import ApiRequest
from gpu_worker.asgi_call import ResponseSink
from gpu_worker.cache_stats import PrefixCacheCount
from gpu_worker.settings import WorkerSettings
from gpu_worker.token_count import TokenCount

FILLER = " tok"
_SSE = [(b"content-type", b"text/event-stream")]
_JSON = [(b"content-type", b"application/json")]


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class SyntheticEngine:
    """Same interface as ``gpu_worker.engine.Engine``; one shared step clock for all requests."""

    adapters: list[str] = []
    tasks = ["generate"]

    def __init__(self, max_num_seqs: int, step_ms: float, tokens_per_step: int, max_model_len: int = 1 << 20) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.prefix_cache = PrefixCacheCount()  # no cache: stays 0
        self._step = step_ms / 1000.0
        self._tokens_per_step = tokens_per_step
        self._tick = asyncio.Event()
        self._clock: asyncio.Task | None = None
        self._aborted: set[str] = set()

    @classmethod
    def start(cls, settings: WorkerSettings) -> "SyntheticEngine":
        return cls(settings.max_num_seqs or 4096, settings.synthetic_step_ms, settings.synthetic_tokens_per_step)

    async def open_api(self) -> None:
        pass

    def shutdown(self) -> None:
        if self._clock is not None:
            self._clock.cancel()

    async def _run_clock(self) -> None:
        """One step for everybody: wake every waiting request, then start a fresh step."""
        while True:
            await asyncio.sleep(self._step)
            tick, self._tick = self._tick, asyncio.Event()
            tick.set()

    async def handle(self, req: ApiRequest, sink: ResponseSink, count: TokenCount) -> None:
        body, chat = req.body, req.endpoint == "/v1/chat/completions"
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if req.endpoint not in ("/v1/chat/completions", "/v1/completions") or not isinstance(max_tokens, int):
            sink.start(400, _JSON)
            await sink.body(json.dumps({"error": {"message": "the synthetic engine serves chat and completions "
                                                  "with max_tokens only", "type": "BadRequestError",
                                                  "param": None, "code": 400}}).encode(), False)
            return
        if self._clock is None:
            self._clock = asyncio.create_task(self._run_clock(), name="synthetic-engine-clock")
        n = int(body.get("n") or 1)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{req.request_id}", "created": int(time.time()),
                "model": body.get("model"),
                "object": "chat.completion.chunk" if chat and req.stream else "chat.completion" if chat
                else "text_completion"}
        count.prompt[req.request_id] = 1
        left, done_tokens = max_tokens, 0
        sink.start(200, _SSE if req.stream else _JSON)
        finish = "length"
        while left > 0:
            await self._tick.wait()
            if req.request_id in self._aborted:
                self._aborted.discard(req.request_id)
                finish = "abort"
                break
            k = min(left, self._tokens_per_step)
            left -= k
            done_tokens += k
            for i in range(n):
                count.output[(req.request_id, i)] = done_tokens
            if req.stream:
                text = FILLER * k
                choices = [{"index": i, "delta": {"content": text}} if chat else {"index": i, "text": text}
                           for i in range(n)]
                await sink.body(_event({**head, "choices": choices}), True)
        usage = count.usage().model_dump()
        if req.stream:
            end = [{"index": i, "delta": {}, "finish_reason": finish} if chat
                   else {"index": i, "text": "", "finish_reason": finish} for i in range(n)]
            tail = _event({**head, "choices": end})
            if (body.get("stream_options") or {}).get("include_usage"):  # vLLM's last chunk: no choices
                tail += _event({**head, "choices": [], "usage": usage})
            await sink.body(tail + b"data: [DONE]\n\n", False)
            return
        text = FILLER * done_tokens
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish} if chat
                   else {"index": i, "text": text, "finish_reason": finish} for i in range(n)]
        await sink.body(json.dumps({**head, "choices": choices, "usage": usage}).encode(), False)

    def abort(self, request_id: str) -> None:
        self._aborted.add(request_id)
