"""The ceiling: the worker's own engine (vLLM's OpenAI layer, called in-process, as the worker
calls it), no HTTP, no broker, same load shape.

``python -m chatai.bench.ceiling SETTINGS_JSON LEVELS_JSON`` prints one JSON list of level
results. It runs in a process of its own because vLLM spawns its engine core (the ``__main__``
guard below) and so that its memory and threads are gone before the next path is measured.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
import uuid

from broker_config.messages import ApiRequest
from chatai.bench.load import LevelResult, RequestRecord, summarize
from gpu_worker.engine import Engine
from gpu_worker.settings import WorkerSettings
from gpu_worker.token_count import TokenCount


class _FirstChunk:
    """A response sink that notes when the first token's event arrives."""

    def __init__(self, count: TokenCount, t0: float, rec: RequestRecord) -> None:
        self.count, self.t0, self.rec = count, t0, rec

    def start(self, status: int, headers: list) -> None:
        pass

    async def body(self, data: bytes, more: bool) -> None:
        if self.count.completion_tokens and math.isnan(self.rec.ttft):
            self.rec.ttft = time.perf_counter() - self.t0


async def _one(engine: Engine, model: str, max_tokens: int, i: int) -> RequestRecord:
    body = {"model": model, "stream": True, "max_tokens": max_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": f"Benchmark request {i}: tell me about the cluster."}]}
    req = ApiRequest(request_id=uuid.uuid4().hex, model=model, endpoint="/v1/chat/completions", body=body,
                     stream=True, reply_to="-")
    rec, count = RequestRecord(), TokenCount()
    t0 = time.perf_counter()
    await engine.handle(req, _FirstChunk(count, t0, rec), count)
    rec.completion_tokens = count.completion_tokens
    rec.latency = time.perf_counter() - t0
    return rec


async def _level(engine: Engine, model: str, concurrency: int, requests: int, max_tokens: int) -> LevelResult:
    counter = iter(range(requests))
    records: list[RequestRecord] = []

    async def client_loop() -> None:
        for i in counter:
            records.append(await _one(engine, model, max_tokens, i))

    t0 = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(min(concurrency, requests))))
    return summarize(concurrency, records, time.perf_counter() - t0)


async def run(settings: WorkerSettings, levels: list[dict]) -> list[LevelResult]:
    engine = await asyncio.to_thread(Engine.start, settings)
    await engine.open_api()
    try:
        results = []
        for lv in levels:
            warmup = lv.get("warmup", 0)
            if warmup:
                await _level(engine, settings.served_model_name or "", warmup, warmup, lv["max_tokens"])
            results.append(await _level(engine, settings.served_model_name or "", lv["concurrency"],
                                        lv["requests"], lv["max_tokens"]))
        return results
    finally:
        engine.shutdown()


def main(argv: list[str]) -> None:
    settings = WorkerSettings.model_validate_json(argv[0])
    levels = json.loads(argv[1])
    results = asyncio.run(run(settings, levels))
    print(json.dumps([r.as_dict() for r in results]), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
