"""Will the worker tasks ``chatai scale up`` submits be able to start? Say so before they sit.

Why: Slurm accepts an array whose tasks can never run (each asks for more than any node has),
or more tasks than there is room for, and leaves them PENDING with a terse reason. An operator
who scales up wants to know at once that, say, one of two workers will wait. This compares one
task's request (CPUs, GPUs, memory) with the nodes' configured and allocated resources from
``scontrol show node`` and returns warnings; it never blocks a submission (room frees up, other
jobs end, and the scheduler, not this estimate, decides).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from slurm_jobs.settings import SlurmSettings

_UNUSABLE = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "INVAL", "MAINT", "REBOOT")
_MEM = re.compile(r"^(\d+(?:\.\d+)?)([KMGT]?)B?$", re.I)
_MEM_FACTOR = {"": 1, "K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}


def mem_mb(text: str | None) -> int:
    """Slurm's memory notation (``4096``, ``500M``, ``32G``; plain numbers are MB) in MB."""
    if not text:
        return 0
    m = _MEM.match(text.strip())
    if not m:
        raise ValueError(f"unreadable memory size {text!r}")
    return int(float(m.group(1)) * _MEM_FACTOR[m.group(2).upper()])


def parse_tres(text: str) -> dict[str, int]:
    """``cpu=8,mem=4G,billing=8,gres/gpu=2`` -> {"cpu": 8, "mem": 4096, "gres/gpu": 2, ...}."""
    out: dict[str, int] = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = item.partition("=")
        try:
            out[key] = mem_mb(value) if key == "mem" else int(value)
        except ValueError:
            continue
    return out


def gres_gpus(gres: str | None) -> int:
    """GPUs per task in an sbatch ``--gres`` value: ``gpu`` 1, ``gpu:2`` 2, ``gpu:a100:2`` 2."""
    total = 0
    for item in filter(None, (gres or "").split(",")):
        parts = item.split(":")
        if parts[0] != "gpu":
            continue
        total += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return total


@dataclass(frozen=True)
class TaskRequest:
    """What one worker task asks for."""

    cpus: int = 1
    gpus: int = 0
    mem_mb: int = 0  # 0: not asked for (then memory is not what holds a task back)

    @classmethod
    def from_settings(cls, s: SlurmSettings) -> "TaskRequest":
        return cls(cpus=s.cpus_per_task or 1, gpus=gres_gpus(s.gres), mem_mb=mem_mb(s.mem))

    def describe(self) -> str:
        parts = [f"{self.cpus} CPU(s)"] + ([f"{self.gpus} GPU(s)"] if self.gpus else []) + \
            ([f"{self.mem_mb} MB"] if self.mem_mb else [])
        return ", ".join(parts)


@dataclass(frozen=True)
class NodeRoom:
    """One node's configured and allocated resources (``scontrol -o show node``)."""

    name: str
    usable: bool
    partitions: tuple[str, ...]
    total: dict[str, int]
    allocated: dict[str, int]

    @classmethod
    def from_scontrol(cls, fields: dict[str, str]) -> "NodeRoom":
        state = fields.get("State", "")
        return cls(name=fields.get("NodeName", "?"), usable=not any(s in state for s in _UNUSABLE),
                   partitions=tuple(filter(None, fields.get("Partitions", "").split(","))),
                   total=parse_tres(fields.get("CfgTRES", "")), allocated=parse_tres(fields.get("AllocTRES", "")))

    def fits(self, req: TaskRequest, free: bool) -> int:
        """How many such tasks this node holds: when empty, or (``free``) beside what runs now."""
        def room(key: str) -> int:
            return self.total.get(key, 0) - (self.allocated.get(key, 0) if free else 0)

        counts = [room("cpu") // max(req.cpus, 1)]
        if req.gpus:
            counts.append(room("gres/gpu") // req.gpus)
        if req.mem_mb:
            counts.append(room("mem") // req.mem_mb)
        return max(min(counts), 0)


def start_warnings(nodes: list[NodeRoom], req: TaskRequest, workers: int, partition: str | None = None) -> list[str]:
    """Warnings for submitting ``workers`` tasks of ``req`` (empty: all of them can start now)."""
    where = f"partition {partition}" if partition else "the cluster"
    nodes = [n for n in nodes if n.usable and (partition is None or partition in n.partitions)]
    if not nodes:
        return [f"no usable node in {where}: the task(s) stay PENDING until one comes back"]
    ever = sum(n.fits(req, free=False) for n in nodes)
    if ever == 0:
        largest = max(nodes, key=lambda n: (n.total.get("cpu", 0), n.total.get("gres/gpu", 0)))
        have = TaskRequest(largest.total.get("cpu", 0), largest.total.get("gres/gpu", 0), largest.total.get("mem", 0))
        return [f"each task asks for {req.describe()}, more than any node of {where} has (largest: {largest.name} "
                f"with {have.describe()}): no task can ever start as the cluster is configured; "
                "change --cpus-per-task, --gres, --mem or --partition"]
    now = sum(n.fits(req, free=True) for n in nodes)
    if now >= workers:
        return []
    out = [f"only {now} of {workers} task(s) fit in the free resources of {where} now (each asks for "
           f"{req.describe()}); the others stay PENDING (Resources) until running jobs end"]
    if ever < workers:
        out.append(f"{where} as configured holds at most {ever} such task(s) at once, even when idle")
    return out
