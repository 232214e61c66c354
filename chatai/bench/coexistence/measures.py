"""The experiment's measures, as pure functions of job intervals (seconds since a run's start).

- idle GPU-time of the baseline: per node, the window minus its regular jobs;
- absorbed fraction: worker GPU-seconds inside the window over the baseline's idle GPU-seconds
  (the regular work is the same in both runs, so this is the share of the idle time workers
  took; node placement may differ between runs, which is why it is not a per-node overlap);
- gap overlap: the stricter per-node, same-time overlap of worker jobs with the baseline's gaps;
- each regular job's start delay: its wait (start - submit) with workers minus its wait alone;
- worker start latency into a gap: in the run with workers, how long a node stood empty before
  a worker job started on it.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from chatai.bench.coexistence.jobcomp import JobRecord


@dataclass(frozen=True)
class Interval:
    node: str
    start: float
    end: float
    kind: str  # "regular" or "worker"
    name: str

    @property
    def length(self) -> float:
        return max(0.0, self.end - self.start)


def intervals(records: Iterable[JobRecord], t0: float, kind_of) -> list[Interval]:
    """One interval per job and node, relative to ``t0``; ``kind_of(record)`` says regular/worker/None (skip)."""
    out = []
    for r in records:
        kind = kind_of(r)
        if kind is None:
            continue
        out.extend(Interval(n, r.start - t0, r.end - t0, kind, r.name) for n in r.nodes)
    return out


def clip(spans: Iterable[tuple[float, float]], lo: float, hi: float) -> list[tuple[float, float]]:
    return [(max(s, lo), min(e, hi)) for s, e in spans if min(e, hi) > max(s, lo)]


def merge(spans: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def total(spans: Iterable[tuple[float, float]]) -> float:
    return sum(e - s for s, e in spans)


def by_node(items: Iterable[Interval], kind: str | None = None) -> dict[str, list[tuple[float, float]]]:
    out: dict[str, list[tuple[float, float]]] = {}
    for i in items:
        if kind is None or i.kind == kind:
            out.setdefault(i.node, []).append((i.start, i.end))
    return out


def idle_spans(busy: Mapping[str, list[tuple[float, float]]], nodes: Iterable[str], window: tuple[float, float]
               ) -> dict[str, list[tuple[float, float]]]:
    """Per node: the parts of ``window`` no busy span covers."""
    lo, hi = window
    out = {}
    for n in nodes:
        gaps, at = [], lo
        for s, e in merge(clip(busy.get(n, []), lo, hi)):
            if s > at:
                gaps.append((at, s))
            at = max(at, e)
        if at < hi:
            gaps.append((at, hi))
        out[n] = gaps
    return out


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two span lists."""
    a, b = merge(a), merge(b)
    i = j = 0
    got = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            got += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return got


def absorbed_fraction(baseline_idle_s: float, worker: Mapping[str, list[tuple[float, float]]],
                      window: tuple[float, float]) -> float:
    """Worker GPU-seconds inside the window over the baseline's idle GPU-seconds (at most 1)."""
    if baseline_idle_s <= 0:
        return 0.0
    used = sum(total(merge(clip(spans, *window))) for spans in worker.values())
    return min(1.0, used / baseline_idle_s)


def gap_overlap_fraction(baseline_idle: Mapping[str, list[tuple[float, float]]],
                         worker: Mapping[str, list[tuple[float, float]]]) -> float:
    """Share of the baseline's gaps (same node, same time) that worker jobs covered."""
    idle = sum(total(g) for g in baseline_idle.values())
    if idle <= 0:
        return 0.0
    return sum(overlap(g, worker.get(n, [])) for n, g in baseline_idle.items()) / idle


def start_delays(baseline: Iterable[JobRecord], with_workers: Iterable[JobRecord]) -> dict[str, float]:
    """Per regular job (by name): how much longer it waited with workers than alone (may be < 0)."""
    base = {r.name: r.start - r.submit for r in baseline}
    return {r.name: (r.start - r.submit) - base[r.name] for r in with_workers if r.name in base}


def summary(values: Iterable[float]) -> dict[str, float | int]:
    v = sorted(values)
    if not v:
        return {"count": 0, "median": 0.0, "max": 0.0, "mean": 0.0}
    return {"count": len(v), "median": statistics.median(v), "max": v[-1], "mean": statistics.fmean(v)}


def gap_fill_latencies(items: Iterable[Interval], window: tuple[float, float]) -> list[float]:
    """Per node, every stretch with no job at all that a worker job ended: its length.

    A node frees up (window start, a job's end) and stays empty until the next job; when that
    next job is a worker, the empty stretch is the time the autoscaler and Slurm took to put a
    worker into the gap. Stretches a regular job ends are idle time no worker took."""
    per_node: dict[str, list[Interval]] = {}
    for i in items:
        per_node.setdefault(i.node, []).append(i)
    out = []
    for jobs in per_node.values():
        jobs.sort(key=lambda i: i.start)
        free_at = window[0]
        for j in jobs:
            if j.start >= window[1]:
                break
            if j.kind == "worker" and j.start >= free_at:
                out.append(j.start - free_at)
            free_at = max(free_at, j.end)
    return out
