"""``chatai dev --slurm``: the one-machine stack with its workers started through Slurm.

Why a separate handle: ``chatai dev`` should not know Slurm's details. It calls
:func:`start_dev_slurm` once, :meth:`DevSlurm.scale_up` for the workers (the very path an
operator's ``chatai scale up`` takes: the rendered batch script, an array, the broker URL in a
0600 file), and :meth:`DevSlurm.stop` on the way out (workers drain on SIGTERM first, then the
daemons stop). Usage::

    slurm = start_dev_slurm(state_dir)                      # ~1 s: munged, slurmctld, slurmd
    job = slurm.scale_up("tiny", model_dir, worker_broker_url, workers=1,
                         worker_args=["--max-num-seqs", "8"])
    ...                                                     # workers pull from the queue
    slurm.stop()                                            # drain, then stop Slurm
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from chatai.devstack.processes import wait_until
from chatai.devstack.slurm_cluster import LocalSlurmCluster, start_local_cluster
from slurm_jobs.jobs import WorkerJobs
from slurm_jobs.settings import SlurmSettings
from slurm_jobs.slurm import Job, Slurm

_MAX_SOCKET_PATH = 100  # a Unix socket path must fit in 108 bytes


@dataclass
class DevSlurm:
    cluster: LocalSlurmCluster
    state_dir: Path

    @property
    def env(self) -> dict[str, str]:
        """``SLURM_CONF`` for anything else (a shell, squeue) that should see this cluster."""
        return self.cluster.env

    def settings(self, worker_args: list[str] | None = None, idle_timeout: int = 0, **overrides) -> SlurmSettings:
        """Dev defaults: one CPU per worker, no GPU, a long time limit, never idle out."""
        values = dict(
            time="08:00:00", time_min=None, cpus_per_task=1, signal_grace=60, drain_grace=30,
            idle_timeout=idle_timeout, log_dir=self.state_dir / "logs", broker_url_file=self._url_file,
            worker_args=" ".join(shlex.quote(a) for a in worker_args or []), models={},
        )
        values.update(overrides)
        return SlurmSettings(**values)

    @property
    def _url_file(self) -> Path:
        return self.state_dir / "worker-broker-url"

    def jobs(self, settings: SlurmSettings | None = None) -> WorkerJobs:
        return WorkerJobs(settings or self.settings(), Slurm(env=self.cluster.env))

    def scale_up(self, model: str, model_path: str | Path, worker_broker_url: str, workers: int = 1,
                 worker_args: list[str] | None = None, idle_timeout: int = 0, **overrides) -> str:
        """Submit ``workers`` array tasks serving ``model``; returns the array job id.

        The worker's broker URL goes into a 0600 file that the batch script reads, never on a
        command line. Worker logs: ``<state_dir>/logs/chatai-worker-<model>-<job>_<task>.out``.
        """
        self._url_file.touch(mode=0o600, exist_ok=True)
        self._url_file.chmod(0o600)
        self._url_file.write_text(worker_broker_url + "\n")
        s = self.settings(worker_args, idle_timeout, **overrides)
        return self.jobs(s).submit(model, workers, str(model_path))

    def worker_jobs(self, model: str | None = None) -> list[Job]:
        return self.jobs().jobs(model)

    def stop(self, timeout: float = 90.0) -> None:
        """Drain every worker (SIGTERM, as ``chatai scale down --all``), wait for the jobs to end,
        then stop Slurm (anything still there is killed with it)."""
        try:
            jobs = self.jobs()
            for model in jobs.jobs_by_model():
                jobs.drain(model)
            wait_until(lambda: not jobs.jobs(), timeout, "the dev workers to drain", every=0.5)
        except Exception:  # noqa: BLE001 - stopping must go on (timed out, or slurmctld is gone)
            pass
        finally:
            self.cluster.stop()


DEV_NODE_CPUS = 8


def start_dev_slurm(state_dir: Path, cpus: int = DEV_NODE_CPUS) -> DevSlurm:
    """Start a private single-node Slurm for ``chatai dev --slurm``; state under ``state_dir/slurm``
    (or a temporary directory when that path is too long for the munge socket).

    The node declares ``cpus`` CPUs (at least the machine's), more than a laptop has: Slurm
    allows it with ``SlurmdParameters=config_overrides``. Each worker asks for one CPU, so with
    the machine's 2 the stack's own worker and a ``scale up --workers 2`` could not all run (the
    last task would stay PENDING (Resources)); the tiny model's workers share the cores fine."""
    state_dir = Path(state_dir).resolve() / "slurm"
    state_dir.mkdir(parents=True, exist_ok=True)
    base = state_dir / "cluster"
    if len(str(base / "munge" / "munge.socket")) > _MAX_SOCKET_PATH:
        base = None  # LocalSlurmCluster makes (and later removes) a short temporary directory
    elif base.exists():
        import shutil

        shutil.rmtree(base)  # stale state of an earlier run: start clean
    cpus = max(cpus, os.cpu_count() or 1)
    return DevSlurm(cluster=start_local_cluster(base_dir=base, cpus_per_node=cpus), state_dir=state_dir)
