"""Worker jobs for one served model: render the batch script, submit arrays, drain, list.

Why a layer between the CLI and :mod:`slurm_jobs.slurm`: ``chatai scale``, the autoscaler and
``chatai dev --slurm`` all submit and drain the same way, with the same job-name convention,
so the rules (one array per submission, TERM before anything harder, pending tasks are simply
cancelled) live here once.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from broker_config.settings_cli import option_name
from slurm_jobs.settings import JOB_NAME_PREFIX, SBATCH_OPTIONS, SlurmSettings, job_name, model_from_job_name
from slurm_jobs.slurm import Job, Slurm

DEFAULT_TEMPLATE = Path(__file__).with_name("worker.sbatch.tmpl")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")


class TemplateError(ValueError):
    pass


def sbatch_directives(s: SlurmSettings, model: str) -> list[str]:
    """The #SBATCH options for a worker: short, interruptible and signalled ahead of its end."""
    opts = [
        f"--job-name={job_name(model)}",
        f"--time={s.time}",
        f"--signal=B:TERM@{s.signal_grace}",
        f"--output={s.log_dir / (job_name(model) + '-%A_%a.out')}",
        f"--export={s.export}",
        "--requeue" if s.requeue else "--no-requeue",
        "--nodes=1",
        "--ntasks=1",
    ]
    for name in SBATCH_OPTIONS:
        if (value := getattr(s, name)) is not None:
            opts.append(f"{option_name(name)}={value}")
    opts.extend(s.extra_sbatch)
    return opts


def render_script(s: SlurmSettings, model: str, model_path: str) -> str:
    """Fill the template; every value is shell-quoted, and an unknown placeholder is an error."""
    if not _MODEL_NAME.match(model):
        raise TemplateError(f"invalid served model name {model!r}")
    template = (s.template or DEFAULT_TEMPLATE).read_text()
    q = shlex.quote
    values = {
        "sbatch_directives": "\n".join(f"#SBATCH {o}" for o in sbatch_directives(s, model)),
        "setup": s.setup,
        "broker_url_file": q(str(s.broker_url_file)),
        "broker_url_env": s.broker_url_env,
        "served_model_name": q(model),
        "model_path": q(model_path),
        "chatai": q(s.chatai),
        "idle_timeout": str(int(s.idle_timeout)),
        "drain_grace": str(int(s.drain_grace)),
        "worker_args": " ".join(q(a) for a in s.worker_argv()),
    }
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s.broker_url_env):
        raise TemplateError(f"invalid variable name {s.broker_url_env!r}")

    def fill(m: re.Match) -> str:
        if m.group(1) not in values:
            raise TemplateError(f"unknown placeholder {{{{ {m.group(1)} }}}} in the worker template")
        return values[m.group(1)]

    return _PLACEHOLDER.sub(fill, template)


@dataclass
class WorkerJobs:
    """Submit, list and drain the worker jobs of every model, as the current (operator) user."""

    settings: SlurmSettings
    slurm: Slurm

    def model_path(self, model: str, model_path: str | None = None) -> str:
        path = model_path or self.settings.models.get(model)
        if not path:
            raise ValueError(f"no model path for {model!r}: pass --model-path or set CHATAI_SLURM_MODELS")
        return path

    def submit(self, model: str, workers: int, model_path: str | None = None, extra: list[str] | None = None) -> str:
        """One ``sbatch --array=0-(N-1)``: N independent tasks the scheduler places one by one."""
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.settings.check()
        script = render_script(self.settings, model, self.model_path(model, model_path))
        self.settings.log_dir.mkdir(parents=True, exist_ok=True)
        return self.slurm.sbatch(script, [f"--array=0-{workers - 1}", *(extra or [])])

    def jobs(self, model: str | None = None) -> list[Job]:
        prefix = job_name(model) if model else JOB_NAME_PREFIX
        jobs = self.slurm.squeue(name_prefix=prefix)
        if model:
            jobs = [j for j in jobs if j.name == job_name(model)]
        return jobs

    def jobs_by_model(self) -> dict[str, list[Job]]:
        out: dict[str, list[Job]] = {}
        for j in self.jobs():
            m = model_from_job_name(j.name)
            if m:
                out.setdefault(m, []).append(j)
        return out

    def cancel_pending(self, model: str, count: int | None = None) -> list[str]:
        """Cancel up to ``count`` pending tasks (newest first): they hold neither GPUs nor requests."""
        pending = [j for j in self.jobs(model) if j.pending]
        pending.sort(key=lambda j: (int(j.array_job_id), int(j.array_task_id or 0)), reverse=True)
        chosen = pending if count is None else pending[:count]
        ids = [j.display_id for j in chosen]
        self.slurm.cancel(ids)
        return ids

    def drain(self, model: str, count: int | None = None, busy: dict[str, int] | None = None) -> list[str]:
        """:meth:`let_go`, as one list of task ids (cancelled, then draining)."""
        cancelled, draining = self.let_go(model, count, busy)
        return cancelled + draining

    def let_go(self, model: str, count: int | None = None,
               busy: dict[str, int] | None = None) -> tuple[list[str], list[str]]:
        """Let ``count`` workers go (all when None): pending tasks are cancelled first, then
        running ones get SIGTERM and drain - never SIGKILL. ``busy`` maps job id -> in-flight
        requests (from heartbeats): the least busy go first. Returns (cancelled, draining) ids."""
        gone = self.cancel_pending(model, count)
        left = None if count is None else count - len(gone)
        if left is not None and left <= 0:
            return gone, []
        busy = busy or {}
        running = [j for j in self.jobs(model) if j.running]
        running.sort(key=lambda j: (busy.get(j.job_id, busy.get(j.display_id, 0)), -int(j.job_id)))
        chosen = running if left is None else running[:left]
        # By task id ("123_4"), never the bare job id: one task of an array carries the array's
        # base id as its own, and Slurm applies a base id to every task of the array.
        self.slurm.signal([j.display_id for j in chosen], "TERM", batch_only=self.settings.cancel_mode == "batch")
        return gone, [j.display_id for j in chosen]
