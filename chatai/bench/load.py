"""The figures of a streamed level and the SSE reader the project's own load generators share.

``chatai bench`` and ``chatai bench relay`` measure with vLLM's own benchmark client
(``chatai.bench.vllm_client``). What stays here serves the loads vLLM's client cannot make: the
in-process ceiling (``chatai.bench.ceiling``, no HTTP at all) and the multi-turn conversations of
``chatai bench affinity``. The figures mean what vLLM's mean:

- time to first token (TTFT): from sending the request to the first chunk with text;
- inter-token latency (ITL): per request, ``(latency - TTFT) / (completion_tokens - 1)``, the
  time per output token after the first (vLLM's "TPOT");
- output tokens per second: completion tokens from each stream's ``usage`` chunk (never a chunk
  count), summed, over the level's wall time.

The closed-loop HTTP client that used to drive ``chatai bench`` is gone: on vLLM's own server it
read 0.65-1.08x of vLLM's client's throughput (docs/performance.md), more than the 10 % a
yardstick may differ by.
"""

from __future__ import annotations

import json
import math
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
