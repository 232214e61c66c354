"""The synthetic token source (a load-test tool for `chatai bench relay`) does what it says."""

from __future__ import annotations

import asyncio

from broker_config.messages import GenerateRequest, SamplingParams
from gpu_worker.synthetic import FILLER, SyntheticEngine


def request(max_tokens: int, n: int = 1, rid: str = "r1") -> GenerateRequest:
    return GenerateRequest(request_id=rid, model="synthetic", kind="completion", prompt="x", reply_to="gw",
                           stream=True, sampling=SamplingParams(max_tokens=max_tokens, n=n))


async def collect(engine: SyntheticEngine, req: GenerateRequest) -> list:
    return [step async for step in engine.generate(req)]


async def test_every_step_gives_each_request_its_tokens_until_max_tokens():
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=3)
    try:
        a, b = await asyncio.gather(collect(engine, request(10, n=2, rid="a")), collect(engine, request(4, rid="b")))
    finally:
        engine.shutdown()
    assert [c.tokens for s in a for c in s.choices if c.index == 0] == [3, 3, 3, 1]
    assert sum(c.tokens for s in a for c in s.choices) == 20  # two choices
    assert a[-1].finished and a[-1].choices[0].finish_reason == "length" and not a[0].finished
    assert "".join(c.text for s in b for c in s.choices) == FILLER * 4


async def test_abort_ends_the_request_with_abort():
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=1)
    steps = []
    try:
        async for step in engine.generate(request(10_000)):
            steps.append(step)
            if len(steps) == 3:
                await engine.abort("r1")
    finally:
        engine.shutdown()
    assert steps[-1].finished and steps[-1].choices[0].finish_reason == "abort"
    assert len(steps) == 4
