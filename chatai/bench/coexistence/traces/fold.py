"""A window of a real trace, folded onto the emulated cluster and compressed in time.

The rules, and why (docs/coexistence.md repeats them):

- **Window.** Jobs submitted in ``[start, start + duration)`` arrive at their offset into the
  window. Jobs submitted earlier that still run (or still wait) at the window's start arrive at
  0 with what is left of their run: the replay starts from the trace's state, not from an empty
  machine. With ``clip`` (the default) no job runs past the window's end (a job that would is
  cut there), so a replay lasts about ``duration / time_scale`` and not as long as the longest job.
- **Fold.** A job of ``w`` processors (or GPUs, or nodes) on a trace machine of capacity ``C``
  takes ``x = w * nodes / C`` emulated nodes: its share of the machine. ``x`` is rounded down or
  up at random with the probability of its fraction (``1.25`` is 1 node three times in four and
  2 nodes once), seeded by the job's id, so the expected node-seconds equal the trace's and the
  trace's utilisation survives the fold (plain rounding up would turn a 1-processor job of a
  128-processor machine into 1/8 of the cluster and overload it; rounding to nearest would drop
  most small jobs' load). Jobs that round to 0 are left out (counted); at most ``nodes``.
  A 128-processor trace on 8 nodes: 16 processors per node, a 1-processor job survives one time
  in 16; a 10,000-processor trace: 1,250 per node, only wide jobs remain as jobs, and the small
  ones' load is kept on average by the few that survive.
- **Time scale.** Trace seconds / ``time_scale`` = replay seconds (60: an hour in a minute).
  Slurm takes time limits in whole minutes, so a scaled limit is rounded **up** to whole minutes
  (at least 1, and at least the scaled run): the replay's limits are never tighter than the
  trace's, but at high scales they are looser (a 10-minute limit at scale 60 is 10 s, asked as
  1 minute), which makes backfill more cautious than on the real machine. Scaled runs shorter
  than ``min_run_s`` (1 s, the job completion log's resolution) are lengthened to it.
"""

from __future__ import annotations

import hashlib
import math
import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from chatai.bench.coexistence.trace import TraceJob
from chatai.bench.coexistence.traces.model import Trace, TraceRecord

_SPAN = re.compile(r"(\d+(?:\.\d+)?)([dhms]?)")
_UNIT = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "": 1.0}


def parse_span(text: str) -> float:
    """``3600``, ``90s``, ``15m``, ``4h``, ``2d``, ``1d12h`` -> seconds."""
    text = text.strip().lower().replace(" ", "")
    pos, total = 0, 0.0
    for m in _SPAN.finditer(text):
        if m.start() != pos or not m.group(0):
            break
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not text or pos != len(text):
        raise ValueError(f"not a duration: {text!r} (use e.g. 3600, 90s, 15m, 4h, 2d, 1d12h)")
    return total


def resolve_start(text: str, trace: Trace) -> float:
    """The window's start on the trace's clock: an offset after its first submit (``2d``), or,
    for a sacct export (Unix time), a date and time (``2026-11-02T08:00``, read as UTC)."""
    try:
        return trace.first_submit + parse_span(text)
    except ValueError:
        pass
    if trace.format != "sacct":
        raise ValueError(f"--start {text!r}: an SWF trace's clock starts at its log's start; give an offset (e.g. 2d6h)")
    from chatai.bench.coexistence.traces.sacct import slurm_time

    when = slurm_time(datetime.fromisoformat(text).strftime("%Y-%m-%dT%H:%M:%S"))
    assert when is not None
    return when


class FoldSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    nodes: int = Field(8, gt=0)
    time_scale: float = Field(60.0, gt=0)
    capacity: int | None = Field(None, gt=0)  # override the trace's
    clip: bool = True
    min_run_s: float = Field(1.0, ge=0)


class Folded(BaseModel):
    """The replayable jobs and what the fold did, for the report."""

    jobs: list[TraceJob]
    window: tuple[float, float]  # trace clock
    capacity: int
    trace_jobs_in_window: int
    carried_in: int  # submitted before the window, still running or waiting at its start
    dropped_too_small: int  # folded to 0 nodes
    clipped: int  # cut at the window's end
    trace_utilisation: float  # of the trace's machine in the window (its real starts and ends)
    folded_offered_load: float  # node-seconds of the replay over the cluster's, arrival = start

    def summary(self) -> dict:
        return self.model_dump(exclude={"jobs"}) | {"jobs": len(self.jobs)}


def _share(key: str) -> float:
    """A stable number in [0, 1) from a job id: the same fold every time, no global seed."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def fold_width(width: int, capacity: int, nodes: int, key: str) -> int:
    x = width * nodes / capacity
    whole = math.floor(x)
    return min(nodes, whole + (1 if _share(key) < x - whole else 0))


def utilisation(records: list[TraceRecord], capacity: int, window: tuple[float, float]) -> float:
    lo, hi = window
    used = sum(r.width * max(0.0, min(r.end, hi) - max(r.start, lo)) for r in records)
    return used / (capacity * (hi - lo)) if hi > lo else 0.0


def fold(trace: Trace, start: float, duration: float, spec: FoldSpec) -> Folded:
    """The jobs of ``[start, start + duration)`` on ``spec.nodes`` nodes, ``spec.time_scale`` times faster."""
    if duration <= 0:
        raise ValueError("the window's duration must be positive")
    lo, hi = start, start + duration
    capacity = spec.capacity or trace.capacity
    S = spec.time_scale
    picked: list[tuple[float, TraceJob]] = []
    in_window = carried = dropped = clipped = 0
    for r in trace.records:
        if r.submit >= hi or r.end <= lo:
            continue
        carry = r.submit < lo
        in_window += not carry
        begin = max(r.submit, lo)  # the replay submits it here
        run = r.end - max(r.start, lo) if carry else r.run_s
        if spec.clip and begin + run > hi:
            run, clipped = hi - begin, clipped + 1
        if run <= 0:
            continue
        nodes = fold_width(r.width, capacity, spec.nodes, r.job_id)
        if nodes == 0:
            dropped += 1
            continue
        carried += carry
        limit = max(r.requested_s - max(0.0, lo - r.start), run) if carry else max(r.requested_s, run)
        run_s = max(spec.min_run_s, round(run / S, 1))
        limit_min = max(1, math.ceil(limit / S / 60), math.ceil((run_s + 1) / 60))
        picked.append((begin, TraceJob(0, round((begin - lo) / S, 2), nodes, limit_min, run_s)))
    picked.sort(key=lambda p: (p[0], p[1].nodes))
    jobs = [TraceJob(i, j.arrival_s, j.nodes, j.limit_min, j.run_s) for i, (_, j) in enumerate(picked)]
    offered = sum(j.nodes * j.run_s for j in jobs) / (spec.nodes * duration / S)
    return Folded(jobs=jobs, window=(lo, hi), capacity=capacity, trace_jobs_in_window=in_window, carried_in=carried,
                  dropped_too_small=dropped, clipped=clipped,
                  trace_utilisation=round(utilisation(trace.records, capacity, (lo, hi)), 4),
                  folded_offered_load=round(offered, 4))
