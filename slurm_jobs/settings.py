"""Operator settings for the Slurm side, from ``CHATAI_SLURM_*`` variables (or a .env file).

Why a settings class: the same knobs (time limits, QOS, GRES, grace) feed ``chatai scale up``,
the autoscaler and ``chatai dev --slurm``; a site sets them once in the operator's environment
instead of repeating flags. Every field can be overridden per call.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

JOB_NAME_PREFIX = "chatai-worker-"

# Settings that are sbatch options of the same name (cpus_per_task: --cpus-per-task), passed
# when set; the others (time, signal, requeue...) are written out in slurm_jobs.jobs.
SBATCH_OPTIONS = ("time_min", "partition", "account", "qos", "gres", "cpus_per_task", "mem", "constraint", "nice")


def job_name(model: str) -> str:
    """The job-name convention: ``chatai-worker-<served model name>``; squeue is filtered by it."""
    return JOB_NAME_PREFIX + model


def model_from_job_name(name: str) -> str | None:
    return name[len(JOB_NAME_PREFIX):] if name.startswith(JOB_NAME_PREFIX) else None


def _default_chatai() -> str:
    # The console script next to this interpreter: it works in a batch job without a login
    # shell, pyenv shims or an activated venv, as long as the path is on a shared filesystem.
    candidate = Path(sys.executable).parent / "chatai"
    return str(candidate) if candidate.exists() else "chatai"


class SlurmSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CHATAI_SLURM_", env_file=".env", extra="ignore")

    # Where the worker's model lives, per served model name: CHATAI_SLURM_MODELS='{"llama": "/models/llama"}'
    models: dict[str, str] = Field(default_factory=dict)

    # --- scheduling: small, interruptible jobs that fit the backfill scheduler's gaps
    partition: str | None = Field(None, description="sbatch --partition.")
    account: str | None = Field(None, description="sbatch --account.")
    qos: str | None = Field(None, description="sbatch --qos, e.g. a scavenger QOS that ordinary jobs may preempt.")
    nice: int | None = Field(None, description="sbatch --nice; positive: lower priority than ordinary work.")
    time: str = Field("02:00:00", description="--time of each task: upper bound of one worker's life.")
    time_min: str | None = Field("00:20:00", description="--time-min: backfill may start a task with less "
                                 "('none': off).")
    requeue: bool = Field(False, description="--requeue: a preempted worker comes back by itself.")
    gres: str | None = Field(None, description='sbatch --gres, e.g. "gpu:1".')
    cpus_per_task: int | None = Field(None, description="sbatch --cpus-per-task.")
    mem: str | None = Field(None, description='sbatch --mem, e.g. "32G".')
    constraint: str | None = Field(None, description="sbatch --constraint (node features).")
    export: str = "ALL"  # sbatch --export; NONE for sites that want a clean job environment
    extra_sbatch: list[str] = Field(default_factory=list)  # any other "--flag=value"

    # --- the worker's end of life
    signal_grace: int = Field(120, description="Seconds of SIGTERM warning before the time limit.")
    drain_grace: int = Field(90, description="Seconds a worker may take to drain; less than --signal-grace.")
    idle_timeout: int = Field(600, description="Seconds without work before a worker exits (scale to zero).")

    # --- how the job runs the worker
    chatai: str = Field(default_factory=_default_chatai)  # absolute path on the compute nodes
    worker_args: str = Field("", description="Extra `chatai worker` options (shell syntax).")
    setup: str = ""  # shell lines run before the worker (module load ..., source venv/bin/activate)
    broker_url_file: Path = Path("~/.config/chatai/worker-broker-url")  # mode 0600, one line: amqp://worker:...
    broker_url_env: str = "CHATAI_WORKER_BROKER_URL"  # the variable the worker reads it from
    log_dir: Path = Path("~/chatai-logs")

    # --- how operator tools (status, autoscaler) reach the broker: the read-only operator user
    operator_broker_url: SecretStr | None = None
    operator_broker_url_file: Path = Path("~/.config/chatai/operator-broker-url")
    template: Path | None = None  # an operator's edited copy of slurm_jobs/worker.sbatch.tmpl
    cancel_mode: str = "batch"  # scancel --batch (the worker is the batch shell) or "full"

    @field_validator("broker_url_file", "log_dir", "template", "operator_broker_url_file")
    @classmethod
    def _expand(cls, v: Path | None) -> Path | None:
        return v.expanduser() if v is not None else None

    @field_validator("time_min", "partition", "account", "qos", "gres", "mem", "constraint", mode="before")
    @classmethod
    def _none(cls, v: object) -> object:
        # "" or "none" in the environment or on the command line switches an option off
        return None if isinstance(v, str) and v.strip().lower() in ("", "none") else v

    @field_validator("cancel_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        if v not in ("batch", "full"):
            raise ValueError("cancel_mode must be 'batch' or 'full'")
        return v

    def check(self) -> None:
        """Refuse settings that would let Slurm kill a worker that is still draining."""
        if self.drain_grace >= self.signal_grace:
            raise ValueError(
                f"drain_grace ({self.drain_grace} s) must be shorter than signal_grace ({self.signal_grace} s): "
                "the worker must finish draining before Slurm's time limit kills it"
            )

    def worker_argv(self) -> list[str]:
        return shlex.split(self.worker_args)

    def operator_url(self) -> str:
        """The operator's broker URL: the variable, else the private file."""
        if self.operator_broker_url is not None:
            return self.operator_broker_url.get_secret_value()
        try:
            return self.operator_broker_url_file.read_text().strip()
        except OSError as exc:
            raise ValueError(
                f"no operator broker URL: set CHATAI_SLURM_OPERATOR_BROKER_URL or write it to "
                f"{self.operator_broker_url_file} (mode 0600)"
            ) from exc
