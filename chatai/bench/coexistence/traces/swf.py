"""The Standard Workload Format of the Parallel Workloads Archive (Feitelson et al.).

One job per line, 18 whitespace-separated numbers, -1 for unknown; header lines begin with
``;`` (``; MaxProcs: 128``). The fields used here (1-based, as the format's definition numbers them):
1 job number, 2 submit time (s since the log's start), 3 wait time, 4 run time,
5 allocated processors, 8 requested processors, 9 requested time (the limit), 11 status
(1 completed, 0 failed, 5 cancelled), 16 partition.

Rules for what is missing (docs/coexistence.md repeats them):
- processors: the allocated count, else the requested one; neither known -> left out;
- run time -1 or 0: the job never ran (or left no trace) -> left out;
- requested time -1: the run time (the user asked for what was used: the tightest limit that
  lets the job finish, which makes backfill on the replay as well informed as it can be);
- wait time -1 (logs that record only start times, e.g. NASA iPSC): the job started at its submit;
- capacity: the header's MaxProcs, else MaxNodes, else the widest job.
"""

from __future__ import annotations

from collections import Counter

from chatai.bench.coexistence.traces.model import Trace, TraceFormatError, TraceRecord

FIELDS = 18
STATUS = {1: "COMPLETED", 0: "FAILED", 5: "CANCELLED", 2: "PARTIAL", 3: "PARTIAL", 4: "PARTIAL", -1: "UNKNOWN"}


def _header(line: str, header: dict[str, str]) -> None:
    key, sep, value = line.lstrip(";").partition(":")
    if sep and key.strip():
        header.setdefault(key.strip(), value.strip())


def _numbers(line: str, line_no: int, source: str) -> list[float]:
    parts = line.split()
    if len(parts) != FIELDS:
        raise TraceFormatError(source, line_no, f"expected {FIELDS} fields, got {len(parts)}", line)
    try:
        return [float(p) for p in parts]
    except ValueError:
        bad = next(p for p in parts if not _is_number(p))
        raise TraceFormatError(source, line_no, f"field {parts.index(bad) + 1} is not a number ({bad!r})", line) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _int_header(header: dict[str, str], key: str) -> int:
    try:
        return int(float(header.get(key, "").split()[0]))
    except (ValueError, IndexError):
        return 0


def parse(text: str, source: str = "<swf>") -> Trace:
    header: dict[str, str] = {}
    records: list[TraceRecord] = []
    skipped: Counter[str] = Counter()
    for line_no, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped:
            continue
        if stripped.startswith(";"):
            _header(stripped, header)
            continue
        f = _numbers(stripped, line_no, source)
        job, submit, wait, run, alloc, req_procs, req_time, status = f[0], f[1], f[2], f[3], f[4], f[7], f[8], f[10]
        width = int(alloc) if alloc > 0 else int(req_procs) if req_procs > 0 else 0
        if submit < 0:
            skipped["submit time unknown"] += 1
        elif run <= 0:
            skipped["never ran (run time -1 or 0)"] += 1
        elif width <= 0:
            skipped["processors unknown"] += 1
        else:
            records.append(TraceRecord(
                job_id=str(int(job)), submit=submit, start=submit + max(wait, 0.0), run_s=run,
                requested_s=req_time if req_time > 0 else run, width=width,
                state=STATUS.get(int(status), str(int(status))),
                partition="" if f[15] < 0 else str(int(f[15]))))
    capacity = _int_header(header, "MaxProcs") or _int_header(header, "MaxNodes") or max(
        (r.width for r in records), default=1)
    if not records:
        raise TraceFormatError(source, 0, "no job that ran" + (f" (left out: {dict(skipped)})" if skipped else ""))
    return Trace(source=source, format="swf", unit="processors", capacity=capacity, records=records,
                 skipped=dict(skipped))
