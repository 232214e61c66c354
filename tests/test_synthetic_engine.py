"""The synthetic token source (a load-test tool for `chatai bench relay`) does what it says."""

from __future__ import annotations

import asyncio
import json

from broker_config.messages import ApiRequest
from gpu_worker.synthetic import FILLER, SyntheticEngine
from gpu_worker.token_count import TokenCount


class Sink:
    def __init__(self) -> None:
        self.status, self.parts = 0, []

    def start(self, status: int, headers: list) -> None:
        self.status = status

    async def body(self, data: bytes, more: bool) -> None:
        self.parts.append(data)

    def events(self) -> list[dict]:
        text = b"".join(self.parts).decode()
        return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


def request(max_tokens: int, n: int = 1, rid: str = "r1", stream: bool = True, **extra) -> ApiRequest:
    return ApiRequest(request_id=rid, model="synthetic", endpoint="/v1/completions", reply_to="gw", stream=stream,
                      body={"model": "synthetic", "prompt": "x", "max_tokens": max_tokens, "n": n, "stream": stream,
                            **extra})


async def run(engine: SyntheticEngine, req: ApiRequest) -> tuple[Sink, TokenCount]:
    sink, count = Sink(), TokenCount()
    await engine.handle(req, sink, count)
    return sink, count


async def test_every_step_gives_each_request_its_tokens_until_max_tokens():
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=3)
    try:
        (a, ca), (b, cb) = await asyncio.gather(run(engine, request(10, n=2, rid="a")), run(engine, request(4, rid="b")))
    finally:
        engine.shutdown()
    steps = [e for e in a.events() if e["choices"][0]["text"]]
    assert [len(e["choices"][0]["text"]) // len(FILLER) for e in steps] == [3, 3, 3, 1]
    assert ca.completion_tokens == 20 and cb.completion_tokens == 4  # two choices of 10, one of 4
    assert a.events()[-1]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in b.events()) == FILLER * 4
    assert b.parts[-1].endswith(b"data: [DONE]\n\n")


async def test_a_stream_ends_with_a_usage_chunk_only_when_asked_as_vllm_does():
    """`chatai bench relay` counts tokens from the usage chunk: without it every stream "failed"."""
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=2)
    try:
        (asked, _), (plain, _) = await asyncio.gather(
            run(engine, request(5, n=2, rid="a", stream_options={"include_usage": True})), run(engine, request(5)))
    finally:
        engine.shutdown()
    last = asked.events()[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10  # two choices of 5
    assert asked.events()[-2]["choices"][0]["finish_reason"] == "length"
    assert not any("usage" in e for e in plain.events())


async def test_a_whole_response_carries_its_text_and_usage():
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=2)
    try:
        sink, count = await run(engine, request(5, stream=False))
    finally:
        engine.shutdown()
    body = json.loads(b"".join(sink.parts))
    assert sink.status == 200 and body["choices"][0]["text"] == FILLER * 5
    assert body["usage"]["completion_tokens"] == 5 == count.completion_tokens


async def test_abort_ends_the_request_with_abort():
    engine = SyntheticEngine(max_num_seqs=8, step_ms=1, tokens_per_step=1)
    try:
        task = asyncio.create_task(run(engine, request(10_000)))
        await asyncio.sleep(0.05)
        engine.abort("r1")
        sink, count = await asyncio.wait_for(task, 10)
    finally:
        engine.shutdown()
    assert sink.events()[-1]["choices"][0]["finish_reason"] == "abort"
    assert 0 < count.completion_tokens < 10_000
