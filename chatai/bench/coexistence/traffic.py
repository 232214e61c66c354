"""A steady stream of chat requests through the gateway with the official SDK; counts outcomes.

Why whole (non-streamed) answers: a worker that drains returns unfinished requests to the
queue and another worker redoes them; a whole answer can be redone invisibly, a stream that
already showed tokens could not. Lost means the client got no answer (an error or a timeout).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from broker_config.timing import pause
from chatai.bench.load import percentile


@dataclass
class TrafficCounts:
    sent: dict[str, int] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)
    lost: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the first few, for the report
    latencies: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        def pct(p: float) -> float | None:  # None, not NaN, for no answers: the report is JSON
            return percentile(self.latencies, p) if self.latencies else None

        return {"sent": self.sent, "served": self.served, "lost": self.lost, "errors": self.errors[:5],
                "latency_p50_s": pct(50), "latency_p99_s": pct(99)}


async def steady_stream(base_url: str, api_key: str, models: dict[str, float], rate: float, max_tokens: int,
                        stop: asyncio.Event, timeout: float = 900.0) -> TrafficCounts:
    """Send ``rate`` requests per second, split between ``models`` by weight, until ``stop``;
    then wait for every answer. Returns the counts."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout)
    counts = TrafficCounts()
    names = list(models)
    credit = dict.fromkeys(names, 0.0)
    weight = sum(models.values())

    async def one(model: str) -> None:
        counts.sent[model] = counts.sent.get(model, 0) + 1
        t = time.monotonic()
        try:
            r = await client.chat.completions.create(
                model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": "Hello, cluster."}])
            ok = bool(r.choices)
        except Exception as exc:  # noqa: BLE001 - every failure is a lost request, kept by type
            ok = False
            counts.errors.append(f"{model}: {type(exc).__name__}: {str(exc)[:200]}")
        key = counts.served if ok else counts.lost
        key[model] = key.get(model, 0) + 1
        if ok:
            counts.latencies.append(time.monotonic() - t)

    tasks: set[asyncio.Task] = set()
    next_at = time.monotonic()
    while not stop.is_set():
        for m in names:  # deterministic weighted round robin
            credit[m] += models[m] / weight
        model = max(names, key=lambda m: credit[m])
        credit[model] -= 1
        task = asyncio.create_task(one(model))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        next_at += 1.0 / rate
        await pause(max(0.0, next_at - time.monotonic()), stop)
    if tasks:
        await asyncio.wait(set(tasks))
    await client.close()
    return counts
