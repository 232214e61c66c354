"""A closed-loop streaming load: N clients, each sending its next chat request when the last ends.

The same load drives every path ``chatai bench`` compares, so their figures mean the same thing:

- time to first token (TTFT): from sending the request to the first chunk with text;
- inter-token latency (ITL): per request, ``(latency - TTFT) / (completion_tokens - 1)``, the
  time per output token after the first (vLLM's "TPOT"). It does not depend on how many tokens
  a server packs into one SSE chunk, so a path that coalesces and one that does not compare fairly;
- output tokens per second: completion tokens from each stream's ``usage`` chunk (never a chunk
  count), summed, over the level's wall time.

The client is plain httpx with a minimal SSE reader: on a 2-core machine the load generator
shares the CPUs with the servers, and a lighter client disturbs both paths less.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field

import httpx


@dataclass
class RequestRecord:
    ttft: float = math.nan
    latency: float = math.nan
    completion_tokens: int = 0
    error: str | None = None

    @property
    def itl(self) -> float:
        if self.completion_tokens < 2 or math.isnan(self.ttft):
            return math.nan
        return (self.latency - self.ttft) / (self.completion_tokens - 1)


@dataclass
class LevelResult:
    """One concurrency level of one path: the figures ``chatai bench`` reports."""

    concurrency: int
    requests: int
    ok: int
    failed: int
    wall_s: float
    output_tokens: int
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    values = sorted(v for v in values if not math.isnan(v))
    if not values:
        return math.nan
    rank = max(1, math.ceil(p / 100 * len(values)))
    return values[rank - 1]


def summarize(concurrency: int, records: list[RequestRecord], wall_s: float) -> LevelResult:
    ok = [r for r in records if r.error is None]
    tokens = sum(r.completion_tokens for r in ok)
    return LevelResult(
        concurrency=concurrency, requests=len(records), ok=len(ok), failed=len(records) - len(ok),
        wall_s=round(wall_s, 3), output_tokens=tokens,
        output_tok_s=round(tokens / wall_s, 1) if wall_s > 0 else 0.0,
        ttft_p50_ms=round(percentile([r.ttft for r in ok], 50) * 1000, 2),
        ttft_p99_ms=round(percentile([r.ttft for r in ok], 99) * 1000, 2),
        itl_p50_ms=round(percentile([r.itl for r in ok], 50) * 1000, 3),
        itl_p99_ms=round(percentile([r.itl for r in ok], 99) * 1000, 3),
        errors=sorted({r.error for r in records if r.error})[:5],
    )


class StreamFailed(Exception):
    """A streamed request failed: a status other than 200, or an error event in the stream."""


async def sse_chunks(client: httpx.AsyncClient, path: str, body: dict) -> AsyncIterator[dict]:
    """The JSON chunks of one streamed request, as they arrive (without ``[DONE]``)."""
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            raise StreamFailed(f"HTTP {resp.status_code}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise StreamFailed(f"stream error: {chunk['error'].get('code')}")
            yield chunk


@dataclass
class StreamLoad:
    """Where to send the load and what each request asks for."""

    base_url: str  # ends in /v1
    api_key: str
    model: str
    max_tokens: int = 64
    timeout: float = 300.0

    def _body(self, i: int) -> dict:
        return {
            "model": self.model, "stream": True, "max_tokens": self.max_tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"Benchmark request {i}: tell me about the cluster."}],
        }

    async def one(self, client: httpx.AsyncClient, i: int) -> RequestRecord:
        rec = RequestRecord()
        t0 = time.perf_counter()
        try:
            async for chunk in sse_chunks(client, "/chat/completions", self._body(i)):
                if math.isnan(rec.ttft) and any(c.get("delta", {}).get("content") for c in chunk.get("choices") or []):
                    rec.ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    rec.completion_tokens = chunk["usage"]["completion_tokens"]
            rec.latency = time.perf_counter() - t0
            if rec.completion_tokens == 0:
                rec.error = "no usage chunk"
        except StreamFailed as exc:
            rec.error = str(exc)
        except (httpx.HTTPError, ValueError) as exc:
            rec.error = type(exc).__name__
        return rec

    async def level(self, concurrency: int, requests: int, warmup: int = 0) -> LevelResult:
        """``requests`` streams, at most ``concurrency`` at a time; ``warmup`` first, not counted."""
        limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.base_url, headers=headers, limits=limits,
                                     timeout=self.timeout) as client:
            if warmup:
                await asyncio.gather(*(self.one(client, -1 - i) for i in range(warmup)))
            counter = iter(range(requests))
            records: list[RequestRecord] = []

            async def client_loop() -> None:
                for i in counter:  # shared iterator: each client takes the next request number
                    records.append(await self.one(client, i))

            t0 = time.perf_counter()
            await asyncio.gather(*(client_loop() for _ in range(min(concurrency, requests))))
            wall = time.perf_counter() - t0
        return summarize(concurrency, records, wall)
