"""The experiment's cluster: 8 one-GPU nodes, a regular and a scavenger partition, preemption.

Why these settings (docs/coexistence.md has the reasoning at length):

- ``PreemptType=preempt/partition_prio``: a job of a higher ``PriorityTier`` partition preempts
  jobs of lower tiers; it needs no accounting database (``preempt/qos`` would).
- ``PreemptMode=CANCEL`` with a ``GraceTime`` on the scavenger partition: a preempted worker
  gets SIGTERM, drains (finishes or returns its requests) and exits; Slurm kills it at the end
  of the grace at the latest. A regular job therefore waits at most ``GraceTime`` for a worker.
- ``SlurmctldParameters=preempt_send_user_signal``: without it Slurm 22.05 sends the
  grace-start SIGTERM to the job's *steps* only ("No steps in jobid N to send signal 15" in
  slurmd's log); a worker is the batch script itself (``exec chatai worker``), so it heard
  nothing until the grace ran out and slurmctld's periodic time-limit check (every 30 s)
  killed it: regular jobs waited GraceTime plus up to 30 s. With it Slurm sends the job's own
  ``--signal=B:TERM@...`` (batch shell) at preemption, and the worker drains at once.
  CANCEL rather than REQUEUE: the autoscaler submits fresh workers, so a requeued one would
  only be a second, uncontrolled source of pending work.
- ``JobCompType=jobcomp/filetxt``: every job's start, end, nodes and state in a text file,
  without slurmdbd; the measures are computed from it.
"""

from __future__ import annotations

from pathlib import Path

from chatai.devstack.slurm_cluster import LocalPartition, LocalSlurmCluster

REGULAR = "regular"
SCAVENGER = "scavenger"
NODES = 8
JOBCOMP_FILE = "jobcomp.txt"  # in the cluster's own folder


def site_conf(jobcomp_path: Path | str = "/var/log/slurm/jobcomp.txt") -> list[str]:
    """The slurm.conf lines a site would add (besides GRES and partitions), for this experiment and the docs."""
    return [
        "PreemptType=preempt/partition_prio",
        "PreemptMode=CANCEL",
        "SlurmctldParameters=preempt_send_user_signal",
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={jobcomp_path}",
        # Backfill every second at a 1 s resolution so compressed time still sees its gaps;
        # bf_continue keeps a long queue from restarting the pass; a site keeps its own values.
        "SchedulerParameters=bf_interval=1,bf_resolution=1,bf_continue,sched_interval=1,sched_min_interval=100000",
    ]


def partitions(grace_s: int) -> list[LocalPartition]:
    return [
        LocalPartition(REGULAR, default=True, options="PriorityTier=10"),
        LocalPartition(SCAVENGER, options=f"PriorityTier=1 PreemptMode=CANCEL GraceTime={grace_s}"),
    ]


def make_cluster(base_dir: Path, grace_s: int, nodes: int = NODES) -> LocalSlurmCluster:
    """An unstarted cluster of ``nodes`` emulated nodes with one (count-only) GPU each."""
    return LocalSlurmCluster.create(
        base_dir=base_dir, nodes=nodes, cpus_per_node=4, memory_mb_per_node=16384, gpus_per_node=1,
        partitions=partitions(grace_s), extra_conf=site_conf(base_dir / JOBCOMP_FILE))


def jobcomp_path(cluster: LocalSlurmCluster) -> Path:
    return cluster.base_dir / JOBCOMP_FILE
