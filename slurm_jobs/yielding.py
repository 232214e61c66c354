"""Give GPUs back to waiting regular jobs at once, and make sure a worker told to go goes.

Why: Slurm's own preemption is the bound, but measured on the emulated cluster it is not prompt
(docs/coexistence.md, "Giving way"): replaying the Curie trace on a quiet machine, regular jobs
that arrived while workers held every GPU started a median 3 s and up to 27 s later than on an
empty cluster, while slurmctld preempted nothing for them between scheduling events; in small
probes (tests/test_coexistence_preemption.py) it preempts for every job of a burst at once, so
the trigger lies in the interplay of a busy queue that we have not pinned down. The autoscaler
sees every waiting job in one look each round and tells as many workers as they need to drain.

And a preemption can go unheard: a worker whose batch step was still being launched when Slurm
signalled it never gets the SIGTERM, and holds the GPU until GraceTime ends (seen: 10 s lost of
a 10 s GraceTime; on a real site, minutes). So a worker told to go, by Slurm or by us, that has
not said "draining" in its heartbeat a few seconds later is told again (``Departures``).

The choices are pure functions of what ``scontrol -o show job`` and ``show node`` report and of
the workers' heartbeats, so the subtle cases (multi-node jobs, several GPUs a node, partitions
that share only some nodes, workers Slurm already told to go) are unit-tested without Slurm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Mapping

from slurm_jobs.capacity import NodeRoom, gres_gpus
from slurm_jobs.settings import JOB_NAME_PREFIX

# Pending reasons of a job that waits for resources, possibly behind others that do, or that has
# just been submitted ("None": not yet looked at; free GPUs are given first, so a job that would
# start anyway costs no worker). Held jobs, dependencies, begin times, limits and reservations are
# not waiting for a worker's GPU.
WAITING_REASONS = frozenset({"Resources", "Priority", "None"})
# Seconds after which a worker told to go that does not say "draining" is told again: its
# heartbeat reports the change at once, so a few seconds cover any delivery delay.
RETELL_AFTER_S = 3.0
HEARD_STATES = frozenset({"draining", "stopped"})
_FIRST_INT = re.compile(r"\d+")
_SINGLE_NODE = re.compile(r"^[^\[\],]+$")


def _gpus_per_node(fields: Mapping[str, str], nodes: int) -> int:
    """GPUs a job asks for on each node: ``TresPerNode=gres:gpu:2`` (22.05), ``gres/gpu:2`` (newer),
    or ``TresPerJob=gres:gpu:4`` spread over its nodes."""
    def gpus(tres: str | None) -> int:
        items = [t.removeprefix("gres:").removeprefix("gres/") for t in (tres or "").split(",")]
        return gres_gpus(",".join(i for i in items if i.startswith("gpu")))

    per_node = gpus(fields.get("TresPerNode"))
    if per_node:
        return per_node
    per_job = gpus(fields.get("TresPerJob"))
    return -(-per_job // max(nodes, 1)) if per_job else 0


@dataclass(frozen=True)
class QueuedJob:
    """What the choice needs of one job, from its ``scontrol -o show job`` line."""

    job_id: str  # SLURM_JOB_ID (unique per array task; what a worker's heartbeat carries)
    task_id: str  # "123_4" for an array task, else the job id: what scancel is given
    name: str
    state: str
    reason: str
    partitions: frozenset[str]
    priority: int
    nodes: int  # NumNodes (the lower bound of a range)
    node_list: str  # where it runs ("(null)" while pending)
    gpus_per_node: int
    preempting: bool  # PreemptTime set: Slurm has already told it to go

    @classmethod
    def from_scontrol(cls, f: Mapping[str, str]) -> "QueuedJob":
        job_id = f.get("JobId", "?")
        array, task = f.get("ArrayJobId"), f.get("ArrayTaskId")
        nodes = int(m.group()) if (m := _FIRST_INT.search(f.get("NumNodes", ""))) else 1
        return cls(
            job_id=job_id, task_id=f"{array}_{task}" if array and task and task.isdigit() else job_id,
            name=f.get("JobName", ""), state=f.get("JobState", ""), reason=f.get("Reason", ""),
            partitions=frozenset(filter(None, f.get("Partition", "").split(","))),
            priority=int(f["Priority"]) if f.get("Priority", "").isdigit() else 0,
            nodes=nodes, node_list=f.get("NodeList", ""), gpus_per_node=_gpus_per_node(f, nodes),
            preempting=f.get("PreemptTime", "None") not in ("None", "", "Unknown"),
        )

    @property
    def is_worker(self) -> bool:
        return self.name.startswith(JOB_NAME_PREFIX)

    def waits_for_gpus(self, worker_partition: str | None) -> bool:
        """A regular job waiting for GPUs: pending for resources, outside the workers' own partition
        (a job there is another scavenger, which takes what is free like ours)."""
        return (not self.is_worker and self.state == "PENDING" and self.reason in WAITING_REASONS
                and self.gpus_per_node > 0 and self.partitions != {worker_partition})


def choose_yields(jobs: list[QueuedJob], nodes: list[NodeRoom], worker_partition: str | None = None,
                  busy: Mapping[str, int] | None = None, leaving: Collection[str] = (),
                  on_unfit: Callable[[QueuedJob, int], None] | None = None) -> list[str]:
    """Task ids of the running workers to tell to drain so that the waiting regular jobs fit.

    Jobs are served in priority order, as Slurm would: each takes free GPUs first, then GPUs of
    workers on nodes of its partition (the least busy worker first, the nodes that need the
    fewest yields first). A job that cannot fit even then (it waits for other regular jobs) is
    left to Slurm and takes nothing. Workers Slurm already preempts, and those in ``leaving``
    (told earlier, still draining), count as GPUs about to be free, never as ones to ask again.
    ``on_unfit(job, nodes_found)`` hears of each job left to Slurm, for the log.
    """
    busy = busy or {}
    usable = {n.name: n for n in nodes if n.usable}
    free = {name: n.total.get("gres/gpu", 0) - n.allocated.get("gres/gpu", 0) for name, n in usable.items()}
    holders: dict[str, list[QueuedJob]] = {name: [] for name in usable}
    for j in jobs:
        if not (j.is_worker and j.state == "RUNNING" and _SINGLE_NODE.match(j.node_list)) or j.node_list not in usable:
            continue
        if j.preempting or j.task_id in leaving or j.job_id in leaving:
            free[j.node_list] += j.gpus_per_node
        else:
            holders[j.node_list].append(j)
    for held in holders.values():
        held.sort(key=lambda w: (busy.get(w.task_id, busy.get(w.job_id, 0)), w.job_id))

    def yields_needed(node: str, gpus: int) -> int | None:
        got, count = free[node], 0
        for w in holders[node]:
            if got >= gpus:
                break
            got, count = got + w.gpus_per_node, count + 1
        return count if got >= gpus else None

    chosen: list[str] = []
    waiting = sorted((j for j in jobs if j.waits_for_gpus(worker_partition)),
                     key=lambda j: (-j.priority, int(j.job_id) if j.job_id.isdigit() else 0))
    for job in waiting:
        fits = [(need, name) for name, n in usable.items() if job.partitions & set(n.partitions)
                and (need := yields_needed(name, job.gpus_per_node)) is not None]
        if len(fits) < job.nodes:
            if on_unfit is not None:
                on_unfit(job, len(fits))
            continue
        for need, name in sorted(fits)[:job.nodes]:
            for _ in range(need):
                w = holders[name].pop(0)
                free[name] += w.gpus_per_node
                chosen.append(w.task_id)
            free[name] -= job.gpus_per_node
    return chosen


@dataclass
class Departures:
    """Workers told to go - by Slurm's preemption or by the autoscaler - and since when.

    Keyed by task id (what a worker's heartbeat carries as its Slurm job id). A worker stays
    here until it no longer runs; it counts as a GPU about to be free, and if its heartbeat does
    not say it heard (``HEARD_STATES``) within ``after`` seconds it is due to be told again.
    """

    after: float = RETELL_AFTER_S
    told_at: dict[str, float] = field(default_factory=dict)

    def observe(self, jobs: Iterable[QueuedJob], now: float) -> None:
        """Forget workers that are gone; note those Slurm has begun to preempt."""
        running = {j.task_id: j for j in jobs if j.is_worker and j.state == "RUNNING"}
        self.told_at = {t: at for t, at in self.told_at.items() if t in running}
        for t, j in running.items():
            if j.preempting:
                self.told_at.setdefault(t, now)

    def told(self, task_ids: Iterable[str], now: float) -> None:
        for t in task_ids:
            self.told_at[t] = now

    def unheard(self, states: Mapping[str, str], now: float) -> list[str]:
        """Workers told at least ``after`` seconds ago whose heartbeat (``states``: task id ->
        state) does not say they are leaving; no heartbeat at all counts as not heard."""
        return sorted(t for t, at in self.told_at.items()
                      if now - at >= self.after and states.get(t) not in HEARD_STATES)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self.told_at
