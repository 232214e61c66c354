"""Job records from Slurm's job completion log (``JobCompType=jobcomp/filetxt``).

Why this log: without slurmdbd there is no ``sacct``, and polling ``squeue`` misses short
jobs and blurs times by the poll interval. slurmctld writes one line per finished job - start,
end, nodes, partition, state - at one-second resolution, with no database. Pure parsing here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
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
