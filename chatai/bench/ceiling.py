"""The ceiling: the worker's own engine adapter in-process, no HTTP, no broker, same load shape.

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

from broker_config.messages import ChatMessage, GenerateRequest, SamplingParams
from chatai.bench.load import LevelResult, RequestRecord, summarize
from gpu_worker.engine import Engine
from gpu_worker.settings import WorkerSettings


async def _one(engine: Engine, model: str, max_tokens: int, i: int) -> RequestRecord:
    req = GenerateRequest(
        request_id=uuid.uuid4().hex, model=model, kind="chat", reply_to="-", stream=True,
        messages=[ChatMessage(role="user", content=f"Benchmark request {i}: tell me about the cluster.")],
        sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    rec = RequestRecord()
    t0 = time.perf_counter()
    async for step in engine.generate(req):
        tokens = sum(c.tokens for c in step.choices)
        if tokens and math.isnan(rec.ttft):
            rec.ttft = time.perf_counter() - t0
        rec.completion_tokens += tokens
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
