"""Real workloads for the coexistence bench: read a trace, cut a window, fold it onto the cluster.

Two formats (``load`` tells them apart by content, not by name):

- ``swf``: the Standard Workload Format of the Parallel Workloads Archive (``.swf``, ``.swf.gz``);
- ``sacct``: a Slurm accounting export, so that a centre can replay its own history (the
  exact ``sacct`` command is ``SACCT_COMMAND`` in ``sacct.py`` and in docs/coexistence.md).

Both become ``TraceRecord``s (``model.py``); ``fold.py`` turns a window of them into the
bench's ``TraceJob``s on the emulated cluster. Why a package: each format is one reader with
its own rules for missing values, and the window/fold/time-scale rules are the same for both.
"""

from __future__ import annotations

import gzip
from pathlib import Path

from chatai.bench.coexistence.trace import TraceJob
from chatai.bench.coexistence.traces.model import Trace, TraceFormatError

__all__ = ["Trace", "TraceFormatError", "load", "read_text"]


def read_text(path: Path) -> str:
    """The file's text; gzip is recognised by its magic bytes, whatever the name says."""
    data = Path(path).read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return data.decode("utf-8", errors="replace")


def load(path: Path) -> Trace:
    """Read an SWF or sacct trace; a file whose first data line has ``|`` is a sacct export."""
    from chatai.bench.coexistence.traces import sacct, swf

    text = read_text(path)
    first = next((ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(";")), "")
    if "|" in first:
        return sacct.parse(text, source=str(path))
    return swf.parse(text, source=str(path))


def replay_plan(path: Path, start: str, duration: str, nodes: int, time_scale: float,
                capacity: int | None = None, clip: bool = True) -> tuple[list[TraceJob], dict]:
    """The bench's regular jobs from a trace window, and what to report about the trace and the fold."""
    from chatai.bench.coexistence.traces.fold import FoldSpec, fold, parse_span, resolve_start

    trace = load(path)
    if capacity is None and trace.records and max(r.width for r in trace.records) > trace.capacity:
        capacity = max(r.width for r in trace.records)  # a header that undercounts the machine
    lo = resolve_start(start, trace)
    folded = fold(trace, lo, parse_span(duration), FoldSpec(nodes=nodes, time_scale=time_scale, capacity=capacity,
                                                             clip=clip))
    if not folded.jobs:
        raise ValueError(f"no job of {path} runs in the window {start} + {duration} "
                         f"({folded.trace_jobs_in_window} submitted in it, {folded.dropped_too_small} folded to 0 nodes)")
    info = {"source": str(path), "format": trace.format, "unit": trace.unit, "trace_jobs_read": len(trace.records),
            "left_out_by_reader": trace.skipped, "start": start, "start_trace_s": round(lo - trace.first_submit, 1),
            "duration": duration, "time_scale": time_scale, "nodes": nodes, **folded.summary()}
    return folded.jobs, info
