"""Load benchmark: many concurrent streamed chats against a running gateway; prints figures.

Point it at ``chatai dev`` (``--stack STATE_DIR/stack.json``) or any gateway (``--base-url``,
``--api-key``). It measures what users feel: time to first token and streaming rate, per
request and overall. Bounded: a fixed number of requests, each with a timeout.

    python benchmarks/stream_load.py --stack .chatai-dev/stack.json --concurrency 32 --requests 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from openai import AsyncOpenAI


async def one(client: AsyncOpenAI, model: str, max_tokens: int, i: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    first = None
    chunks = 0
    stream = await client.chat.completions.create(
        model=model, stream=True, max_tokens=max_tokens, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": f"Benchmark request {i}: tell me about the cluster."}])
    tokens = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first if first is not None else time.perf_counter() - t0
            chunks += 1
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return (first if first is not None else float("nan")), time.perf_counter() - t0, tokens


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stack", type=Path, help="stack.json written by chatai dev")
    ap.add_argument("--base-url")
    ap.add_argument("--api-key")
    ap.add_argument("--model", default=None)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=64)
    args = ap.parse_args()
    stack = json.loads(args.stack.read_text()) if args.stack else {}
    base_url = args.base_url or stack["gateway_url"]
    client = AsyncOpenAI(base_url=base_url, api_key=args.api_key or stack["api_key"], max_retries=0, timeout=300)
    model = args.model or stack.get("model", "tiny")

    sem = asyncio.Semaphore(args.concurrency)

    async def bounded(i: int):
        async with sem:
            return await one(client, model, args.max_tokens, i)

    t0 = time.perf_counter()
    results = await asyncio.gather(*(bounded(i) for i in range(args.requests)), return_exceptions=True)
    wall = time.perf_counter() - t0
    ok = [r for r in results if not isinstance(r, BaseException)]
    errors = [r for r in results if isinstance(r, BaseException)]
    ttft = [r[0] for r in ok]
    tokens = sum(r[2] for r in ok)
    print(f"requests {len(ok)} ok, {len(errors)} failed; concurrency {args.concurrency}; "
          f"{args.max_tokens} tokens each; wall {wall:.1f} s")
    if ok:
        print(f"TTFT  p50 {pct(ttft, 50) * 1000:.0f} ms  p90 {pct(ttft, 90) * 1000:.0f} ms  "
              f"p99 {pct(ttft, 99) * 1000:.0f} ms  mean {statistics.mean(ttft) * 1000:.0f} ms")
        print(f"throughput {tokens / wall:.0f} tokens/s, {len(ok) / wall:.1f} requests/s")
    for e in errors[:5]:
        print(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    asyncio.run(main())
