"""The coexistence cluster tells a preempted worker at once (docs/coexistence.md, "Where the
delay came from").

A scavenger job shaped like a worker - the batch script itself is the process, with the
worker's own ``--signal=B:TERM@...`` - holds the only GPU; a regular job then wants it. The
scavenger partition's GraceTime is far longer than the test waits, so the regular job can
start only if the SIGTERM reaches the batch script at preemption and it exits: without
``SlurmctldParameters=preempt_send_user_signal`` Slurm 22.05 signals job steps only and the
GPU stays taken until the grace runs out. Plain ``sleep`` jobs: cheap, no broker, no engine.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from chatai.bench.coexistence.cluster import REGULAR, SCAVENGER, make_cluster
from chatai.devstack.slurm_cluster import slurm_installed
from slurm_jobs.jobs import sbatch_directives
from slurm_jobs.settings import SlurmSettings
from support.waiting import wait_until

pytestmark = pytest.mark.slow

GRACE_S = 900  # far beyond WAIT_S: a start within WAIT_S cannot be the grace running out
WAIT_S = 120


def _worker_signal_option() -> str:
    """The --signal option chatai's worker jobs carry (slurm_jobs.jobs.sbatch_directives)."""
    opts = sbatch_directives(SlurmSettings(signal_grace=60, drain_grace=30), "probe")
    return next(o for o in opts if o.startswith("--signal="))


def _sbatch(env: dict[str, str], partition: str, *opts: str, command: str) -> str:
    """Submit a one-GPU ``--wrap`` job to the test cluster; returns its id."""
    proc = subprocess.run(["sbatch", "--parsable", f"--partition={partition}", "--gres=gpu:1",
                           "--output=/dev/null", *opts, "--wrap", command],
                          capture_output=True, text=True, env=env, timeout=30, check=True)
    return proc.stdout.strip().split(";")[0]


def test_a_regular_job_takes_a_workers_gpu_without_waiting_for_the_grace(tmp_path):
    if not (slurm_installed() and os.geteuid() == 0):
        pytest.fail("needs Slurm and root (scripts/install.sh sets them up)")
    cluster = make_cluster(tmp_path / "slurm", grace_s=GRACE_S, nodes=1)
    env = cluster.client_env()

    def state(job: str) -> str:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env,
                             timeout=30).stdout.strip()
        return out or "GONE"

    with cluster:
        worker = _sbatch(env, SCAVENGER, "--time=30", _worker_signal_option(), command="exec sleep 3600")
        wait_until(lambda: state(worker) == "RUNNING", 60, "the worker-shaped job to run")
        regular = _sbatch(env, REGULAR, "--time=5", command="exec sleep 600")
        wait_until(lambda: state(regular) == "RUNNING", WAIT_S,
                   f"the regular job to get the GPU well before the {GRACE_S} s GraceTime")
        assert state(worker) == "GONE"


def test_the_autoscaler_gives_way_to_a_burst_and_tells_again_a_worker_that_did_not_hear(tmp_path):
    """Three regular jobs arrive at once on three GPUs that workers hold. Between Slurm's own
    preemptions and the autoscaler's give-way every worker is told once, none twice; a worker
    whose heartbeat still says "ready" a few seconds later (its SIGTERM lost, as Slurm loses one
    sent while a batch step is launching) is told again. The workers note each SIGTERM and keep
    running (GraceTime 900 s), so the moment is frozen; the autoscaler's clock is passed in, so
    nothing depends on how fast anything is. (In these probes Slurm preempts for all three jobs
    itself; the bench's busier queue is where it did not, docs/coexistence.md.)"""
    if not (slurm_installed() and os.geteuid() == 0):
        pytest.fail("needs Slurm and root (scripts/install.sh sets them up)")
    from broker_config.messages import Heartbeat
    from slurm_jobs.autoscale import Autoscaler
    from slurm_jobs.jobs import WorkerJobs
    from slurm_jobs.slurm import Slurm
    from slurm_jobs.yielding import RETELL_AFTER_S, QueuedJob

    cluster = make_cluster(tmp_path / "slurm", grace_s=GRACE_S, nodes=3)
    env = cluster.client_env()
    marks = tmp_path / "marks"
    marks.mkdir()
    stop = tmp_path / "stop"
    slurm = Slurm(env=env)

    def jobs() -> dict[str, QueuedJob]:
        return {j.job_id: j for j in map(QueuedJob.from_scontrol, slurm.show_jobs())}

    def terms(worker: str) -> int:
        mark = marks / worker
        return len(mark.read_text().split()) if mark.exists() else 0

    def beats(**states: str) -> list[Heartbeat]:
        return [Heartbeat(worker_id=f"w{w}", model="m", state=state, capacity=8, in_flight=0, node="n",
                          slurm_job_id=w, sent_at=0.0) for w, state in states.items()]

    hold_on = f"trap 'echo TERM >> {marks}/$SLURM_JOB_ID' TERM; while [ ! -e {stop} ]; do sleep 0.2; done"
    with cluster:
        try:
            workers = [_sbatch(env, SCAVENGER, "--time=30", "--job-name=chatai-worker-probe", _worker_signal_option(),
                              command=hold_on) for _ in range(3)]
            wait_until(lambda: all(jobs()[w].state == "RUNNING" for w in workers), 60, "the workers to run")
            burst = [_sbatch(env, REGULAR, "--time=5", command="exec sleep 1") for _ in range(3)]
            wait_until(lambda: any(jobs()[w].preempting for w in workers), 60, "Slurm to preempt for the burst")
            scaler = Autoscaler(WorkerJobs(SlurmSettings(partition=SCAVENGER), slurm), view=None, policies={})
            ready = beats(**{w: "ready" for w in workers})
            told = scaler.give_way(ready, now=0.0)
            by_slurm = {w for w in workers if jobs()[w].preempting}
            print(f"\nSlurm preempted {len(by_slurm)} of 3 workers at first; the autoscaler told {len(told)}")
            assert all(jobs()[r].state == "PENDING" for r in burst)
            assert set(told) | by_slurm == set(workers), "the burst needs all three GPUs"
            wait_until(lambda: all(terms(w) >= 1 for w in workers) and not scaler.signalling, 30,
                       "every worker to hear SIGTERM")
            assert scaler.give_way(ready, now=RETELL_AFTER_S / 2) == [], "told again before it could answer"
            heard_so_far = {w: terms(w) for w in workers}

            deaf = workers[-1]
            heard = beats(**{w: ("ready" if w == deaf else "draining") for w in workers})
            assert scaler.give_way(heard, now=RETELL_AFTER_S + 0.1) == [deaf]
            wait_until(lambda: terms(deaf) == heard_so_far[deaf] + 1 and not scaler.signalling, 30,
                       "the worker that did not hear to be told again")
            assert scaler.give_way(beats(**{w: "draining" for w in workers}), now=2 * RETELL_AFTER_S + 1) == []
            assert {w: terms(w) for w in workers} == {**heard_so_far, deaf: heard_so_far[deaf] + 1}
        finally:
            stop.touch()
