"""Job records from Slurm's job completion log (``JobCompType=jobcomp/filetxt``).

Why this log: without slurmdbd there is no ``sacct``, and polling ``squeue`` misses short
jobs and blurs times by the poll interval. slurmctld writes one line per finished job - start,
end, nodes, partition, state - at one-second resolution, with no database; slurmctld's own log has
the same moments to the millisecond, and ``refine`` puts those in. Pure parsing here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

_KEY = re.compile(r"(?:^|\s)([A-Za-z]+)=")


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    name: str
    partition: str
    state: str
    nodes: tuple[str, ...]
    submit: float  # Unix times
    start: float
    end: float


def parse_fields(line: str) -> dict[str, str]:
    """``Key=value Key=value ...``; a value may hold spaces (a job name, a work dir)."""
    marks = list(_KEY.finditer(line))
    out = {}
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(line)
        out[m.group(1)] = line[m.end():end].strip()
    return out


def expand_hostlist(text: str) -> tuple[str, ...]:
    """Slurm's compressed host lists: ``n[0-2,5],gpu7`` -> n0 n1 n2 n5 gpu7 (one bracket per name)."""
    hosts: list[str] = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", text.strip()):
        m = re.fullmatch(r"(.*)\[([^\]]*)\](.*)", part)
        if not m:
            if part and part not in ("(null)", "None assigned"):
                hosts.append(part)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            width = len(lo)
            for i in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return tuple(hosts)


def _time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def parse_jobcomp(text: str) -> list[JobRecord]:
    """Every job that ran (had a start and nodes); jobs cancelled while pending are left out."""
    out = []
    for line in text.splitlines():
        f = parse_fields(line)
        start, end, submit = _time(f.get("StartTime", "")), _time(f.get("EndTime", "")), _time(f.get("SubmitTime", ""))
        nodes = expand_hostlist(f.get("NodeList", ""))
        if start is None or end is None or not nodes or "JobId" not in f:
            continue
        jid = f["JobId"]
        if f.get("ArrayJobId") and f.get("ArrayTaskId"):
            jid = f"{f['ArrayJobId']}_{f['ArrayTaskId']}"
        out.append(JobRecord(jid, f.get("Name", ""), f.get("Partition", ""), f.get("JobState", ""), nodes,
                             submit if submit is not None else start, start, end))
    return out


# slurmctld.log lines that carry a job's submit, start and end to the millisecond (LogTimeFormat's
# default, iso8601_ms): "[2026-12-04T10:34:08.389] _slurm_rpc_submit_batch_job: JobId=1 ...",
# "... sched: Allocate JobId=5 NodeList=...", "... sched/backfill: _start_job: Started JobId=1_0(2) in
# ...", "... _job_complete: JobId=1_1(1) done". An array task is "array_task(raw id)".
_CTLD_LINE = re.compile(
    r"^\[(?P<at>[0-9T:.-]+)\] (?:(?P<submit>_slurm_rpc_submit_batch_job: )|(?P<start>sched: Allocate |"
    r"sched/backfill: _start_job: Started )|(?P<end>_job_complete: ))JobId=(?P<id>\d+(?:_\d+)?)(?:\(\d+\))?"
    r"(?P<rest>.*)$")


def parse_ctld_times(text: str) -> dict[str, dict[str, float]]:
    """Job id (as ``JobRecord`` names it) -> its ``submit``/``start``/``end`` Unix times from the log.

    Why: the job completion log has whole seconds, so each job's wait and length are known to +-1 s;
    on a trace whose jobs and gaps last seconds that noise is as large as what is measured (the
    same NASA window gave regular jobs 695-737 GPU-seconds in runs of one trace). The first
    line of each kind counts; an end is a ``done`` line (a job that ran to its end or drained).
    """
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        m = _CTLD_LINE.match(line)
        if not m or (m["end"] and not m["rest"].strip().endswith("done")):
            continue
        at = _time(m["at"])
        kind = "submit" if m["submit"] else "start" if m["start"] else "end"
        if at is not None:
            out.setdefault(m["id"], {}).setdefault(kind, at)
    return out


def refine(records: Iterable[JobRecord], times: Mapping[str, Mapping[str, float]],
           within: float = 1.5) -> list[JobRecord]:
    """The records with the log's millisecond times where it has them; a time more than ``within``
    seconds from the job log's (another job's line, a clock change) is not taken. An array task's
    submit is its array's."""
    out = []
    for r in records:
        t = dict(times.get(r.job_id.split("_")[0], {}) if "_" in r.job_id else {})
        t.update(times.get(r.job_id, {}))
        exact = {k: t[k] if k in t and abs(t[k] - getattr(r, k)) <= within else getattr(r, k)
                 for k in ("submit", "start", "end")}
        out.append(replace(r, **exact))
    return out
