"""A Slurm accounting export, so that a centre can replay its own history.

Produced by (one line per job allocation, pipe-separated, with a header line)::

    sacct -a -X -P -S 2026-11-02T00:00 -E 2026-11-03T00:00 \\
      --format=JobID,Submit,Start,End,Elapsed,Timelimit,AllocNodes,AllocTRES,Partition,State > day.sacct

``-a`` all users, ``-X`` allocations only (no ``.batch``/``.extern`` steps), ``-P`` parsable
(``|``, no trailing one); ``-S``/``-E`` pick the period (without them sacct shows today only).
Add ``-r PARTITION`` to keep the GPU partitions. A file without the header line is read in
the column order above.

Rules (docs/coexistence.md repeats them):
- times are Slurm's ``YYYY-MM-DDTHH:MM:SS``, read as UTC (only differences matter, and a
  daylight-saving jump must not move jobs); ``Unknown``/``None`` start: never started -> left out;
  ``Unknown`` end: still running when exported -> left out;
- the run time is End - Start (Elapsed when End is missing but Start is known is not used:
  such a job is still running); 0 s -> left out;
- ``Timelimit`` is ``[D-]HH:MM:SS``, ``MM:SS``, ``MM`` or ``D-HH[:MM]``; ``UNLIMITED``,
  ``Partition_Limit`` or empty: the run time (as for SWF);
- the width: the job's GPUs (``gres/gpu=N`` in AllocTRES, or the sum of typed
  ``gres/gpu:TYPE=N``) when the export has any GPU job (jobs without a GPU are then left
  out), else its ``AllocNodes``;
- the state keeps its first word (``CANCELLED by 1234`` -> ``CANCELLED``);
- the capacity (no header to say it): the peak of concurrent width in the export, a lower
  bound for the machine (``--trace-capacity`` overrides it).
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import datetime, timezone

from chatai.bench.coexistence.traces.model import Trace, TraceFormatError, TraceRecord
from slurm_jobs.slurm import parse_duration

COLUMNS = ("JobID", "Submit", "Start", "End", "Elapsed", "Timelimit", "AllocNodes", "AllocTRES", "Partition", "State")
SACCT_COMMAND = ("sacct -a -X -P -S START -E END "
                 "--format=JobID,Submit,Start,End,Elapsed,Timelimit,AllocNodes,AllocTRES,Partition,State")
NOT_A_TIME = {"", "unknown", "none", "n/a"}
NO_LIMIT = {"", "unlimited", "partition_limit", "infinite", "invalid", "n/a", "none"}
_GPU = re.compile(r"gres/gpu(?::[^=,]+)?=(\d+)")


def slurm_time(text: str) -> float | None:
    """``2026-11-25T10:00:05`` -> Unix seconds (as UTC); Unknown/None -> None."""
    text = text.strip()
    if text.lower() in NOT_A_TIME:
        return None
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def slurm_limit(text: str) -> float | None:
    """A Timelimit in seconds (Slurm's duration forms); None when the job had none of its own."""
    if text.strip().lower() in NO_LIMIT:
        return None
    seconds = parse_duration(text)
    return None if seconds is None else float(seconds)


def gpus(tres: str) -> int:
    """GPUs in an AllocTRES string: the untyped ``gres/gpu=N`` if there, else the typed ones summed."""
    untyped = re.search(r"gres/gpu=(\d+)", tres)
    if untyped:
        return int(untyped.group(1))
    return sum(int(n) for n in _GPU.findall(tres))


def _columns(first: list[str]) -> tuple[dict[str, int], bool]:
    names = [c.strip().lower() for c in first]
    if "jobid" in names:
        return {c: names.index(c.lower()) for c in COLUMNS if c.lower() in names}, True
    return {c: i for i, c in enumerate(COLUMNS)}, False


def _peak(records: list[TraceRecord]) -> int:
    events = sorted([(r.start, r.width) for r in records] + [(r.end, -r.width) for r in records],
                    key=lambda e: (e[0], e[1]))
    now = peak = 0
    for _, d in events:
        now += d
        peak = max(peak, now)
    return max(peak, 1)


def parse(text: str, source: str = "<sacct>") -> Trace:
    lines = [(n, ln) for n, ln in enumerate(text.splitlines(), start=1) if ln.strip()]
    if not lines:
        raise TraceFormatError(source, 0, "empty sacct export")
    cols, has_header = _columns(lines[0][1].split("|"))
    missing = [c for c in ("JobID", "Submit", "Start", "End", "Timelimit", "AllocNodes", "AllocTRES", "State")
               if c not in cols]
    if missing:
        raise TraceFormatError(source, lines[0][0], f"header lacks {', '.join(missing)} (use: {SACCT_COMMAND})",
                               lines[0][1])
    width_of = len(lines[0][1].split("|")) if has_header else len(COLUMNS)
    rows: list[tuple[TraceRecord, int]] = []
    skipped: Counter[str] = Counter()
    for line_no, line in lines[1:] if has_header else lines:
        f = line.split("|")
        if len(f) != width_of:
            raise TraceFormatError(source, line_no, f"expected {width_of} '|'-separated fields, got {len(f)}", line)
        get = lambda c: f[cols[c]].strip() if c in cols else ""  # noqa: E731
        try:
            submit, start, end = slurm_time(get("Submit")), slurm_time(get("Start")), slurm_time(get("End"))
        except ValueError as exc:
            raise TraceFormatError(source, line_no, f"not a Slurm time ({exc})", line) from None
        try:
            limit = slurm_limit(get("Timelimit"))
        except ValueError:
            raise TraceFormatError(source, line_no, f"Timelimit {get('Timelimit')!r} is not a Slurm duration", line) from None
        try:
            nodes = int(get("AllocNodes") or 0)
        except ValueError:
            raise TraceFormatError(source, line_no, f"AllocNodes {get('AllocNodes')!r} is not a number", line) from None
        state = (get("State").split() or [""])[0]
        if start is None or nodes == 0:
            skipped["never started"] += 1
        elif end is None:
            skipped["still running when exported"] += 1
        elif end - start <= 0:
            skipped["ran 0 s"] += 1
        else:
            run = end - start
            rows.append((TraceRecord(job_id=get("JobID"), submit=submit if submit is not None else start, start=start,
                                     run_s=run, requested_s=limit or run, width=nodes, state=state,
                                     partition=get("Partition")), gpus(get("AllocTRES"))))
    with_gpus = any(g > 0 for _, g in rows)
    records = []
    for r, g in rows:
        if not with_gpus:
            records.append(r)
        elif g > 0:
            records.append(r.model_copy(update={"width": g}))
        else:
            skipped["no GPU (AllocTRES without gres/gpu)"] += 1
    if not records:
        raise TraceFormatError(source, 0, "no job that ran" + (f" (left out: {dict(skipped)})" if skipped else ""))
    return Trace(source=source, format="sacct", unit="GPUs" if with_gpus else "nodes", capacity=_peak(records),
                 records=records, skipped=dict(skipped))
