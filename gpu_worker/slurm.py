"""What the worker learns from Slurm about its own job: its id and when it will be ended.

A worker must stop taking work early enough to finish what it holds before Slurm kills the
job, so it asks ``squeue`` (falling back to ``scontrol``) for the job's end time. The time can
move (an admin extends the job), so the caller polls this now and then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

log = logging.getLogger("chatai.worker.slurm")


@dataclass(frozen=True)
class SlurmEnv:
    """What Slurm tells a job about itself through ``SLURM_*`` variables (read only here)."""

    job: str | None  # SLURM_JOB_ID: this job's (or array task's) own unique id
    array_job: str | None
    array_task: str | None

    @classmethod
    def read(cls, env: Mapping[str, str] = os.environ) -> "SlurmEnv":
        return cls(env.get("SLURM_JOB_ID") or None, env.get("SLURM_ARRAY_JOB_ID") or None,
                   env.get("SLURM_ARRAY_TASK_ID") or None)


def job_id(env: SlurmEnv | None = None) -> str | None:
    """The job as Slurm names it: ``ARRAYJOB_TASK`` for array tasks, else SLURM_JOB_ID."""
    env = env or SlurmEnv.read()
    if env.array_job and env.array_task:
        return f"{env.array_job}_{env.array_task}"
    return env.job


def parse_end_time(text: str) -> float | None:
    """Slurm prints local times like 2026-11-25T09:10:00; "Unknown"/"N/A" mean no limit."""
    text = text.strip()
    m = re.search(r"EndTime=(\S+)", text)
    if m:
        text = m.group(1)
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


async def _run(*cmd: str) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=15)
    except (OSError, asyncio.TimeoutError):
        return None
    return out.decode(errors="replace") if proc.returncode == 0 else None


async def job_end_time(slurm_job_id: str | None = None) -> float | None:
    """Unix time at which Slurm ends this job, or None when unknown or unlimited."""
    jid = SlurmEnv.read().job if slurm_job_id is None else slurm_job_id
    if not jid:
        return None
    out = await _run("squeue", "-h", "-j", jid, "-o", "%e")
    end = parse_end_time(out) if out else None
    if end is None:
        out = await _run("scontrol", "show", "job", jid)
        end = parse_end_time(out) if out else None
    return end
