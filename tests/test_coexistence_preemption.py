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


def test_a_regular_job_takes_a_workers_gpu_without_waiting_for_the_grace(tmp_path):
    if not (slurm_installed() and os.geteuid() == 0):
        pytest.fail("needs Slurm and root (scripts/install.sh sets them up)")
    cluster = make_cluster(tmp_path / "slurm", grace_s=GRACE_S, nodes=1)
    env = cluster.client_env()

    def sbatch(partition: str, *opts: str, command: str) -> str:
        proc = subprocess.run(["sbatch", "--parsable", f"--partition={partition}", "--gres=gpu:1",
                               "--output=/dev/null", *opts, "--wrap", command],
                              capture_output=True, text=True, env=env, timeout=30, check=True)
        return proc.stdout.strip().split(";")[0]

    def state(job: str) -> str:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, env=env,
                             timeout=30).stdout.strip()
        return out or "GONE"

    with cluster:
        worker = sbatch(SCAVENGER, "--time=30", _worker_signal_option(), command="exec sleep 3600")
        wait_until(lambda: state(worker) == "RUNNING", 60, "the worker-shaped job to run")
        regular = sbatch(REGULAR, "--time=5", command="exec sleep 600")
        wait_until(lambda: state(regular) == "RUNNING", WAIT_S,
                   f"the regular job to get the GPU well before the {GRACE_S} s GraceTime")
        assert state(worker) == "GONE"
