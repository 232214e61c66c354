"""A thin, typed wrapper over the Slurm commands: sbatch, squeue, scancel, scontrol.

Why the commands and not slurmrestd: they exist on every login node, need no extra daemon or
token, and honour the operator's own identity and limits. Output is asked for in parsable form
(``--parsable``, ``-o`` with a separator, ``-r`` to expand arrays) so that nothing here
scrapes human-oriented text; every failure raises :class:`SlurmError` with Slurm's message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

SEP = "\x1f"  # unit separator: never appears in a job name or a reason
_SQUEUE_FIELDS = ("%A", "%F", "%K", "%i", "%j", "%T", "%r", "%M", "%l", "%L", "%N", "%u", "%Q", "%S")

# Variables never handed to sbatch: with --export=ALL Slurm stores the submit environment in
# its state (readable by Slurm admins, shown by `scontrol show job -d`, kept in accounting), so
# secrets must not travel that way (the job reads them from a private file). By name: anything
# that names a password, secret, token, key, credential or auth, and the cloud providers' whole
# prefixes (settings such as CHATAI_WORKER_COALESCE_TOKENS or TOKENIZERS_PARALLELISM stay);
# by value: URLs with a password in them and PEM private keys, whatever their name.
_SECRET_NAME = re.compile(
    r"PASSW|_PWD$|PASSPHRASE|SECRET|(^|_)TOKEN(_|$)|TOKEN$|CREDENTIAL|AUTH|COOKIE|SESSION_?KEY|PRIVATE|SIGNING"
    r"|API_?KEY|ACCESS_?KEY|(^|_)KEY(_ID)?$|_KEYS?_|BROKER_URL|DATABASE_URL|_DSN$|^DSN$"
    r"|^AWS_|^AZURE_|^ARM_CLIENT|^GOOGLE_|^GCP_|^GCLOUD_|^VAULT_|^SSH_AUTH_SOCK$",
    re.I)
_SECRET_VALUE = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]*:[^/?#@\s]*@|-----BEGIN [A-Z ]*PRIVATE KEY", re.I)


def scrub_secrets(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the variables that look like secrets (by name or by value)."""
    return {k: v for k, v in env.items() if not _SECRET_NAME.search(k) and not _SECRET_VALUE.search(v)}


RUNNING_STATES = frozenset({"RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "STOPPED"})
PENDING_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING"})


class SlurmError(RuntimeError):
    """A Slurm command failed; the message carries the command and Slurm's own words."""


@dataclass(frozen=True)
class Job:
    """One line of ``squeue -r``: a job, or one task of an array."""

    job_id: str  # unique id of this job / array task (what SLURM_JOB_ID says inside it)
    array_job_id: str  # the array's base id (= job_id for plain jobs)
    array_task_id: str | None  # None for plain jobs
    display_id: str  # "123_4" for array tasks
    name: str
    state: str
    reason: str
    elapsed: str
    time_limit: str
    time_left: str
    nodes: str
    user: str
    priority: int
    start_time: str

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES and self.state != "COMPLETING"

    @property
    def pending(self) -> bool:
        return self.state in PENDING_STATES


def parse_squeue(text: str) -> list[Job]:
    jobs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        f = line.split(SEP)
        if len(f) != len(_SQUEUE_FIELDS):
            raise SlurmError(f"unexpected squeue line: {line!r}")
        task = f[2] if f[2] not in ("N/A", "") else None
        try:
            prio = int(float(f[12]))
        except ValueError:
            prio = 0
        jobs.append(Job(job_id=f[0], array_job_id=f[1], array_task_id=task, display_id=f[3], name=f[4],
                        state=f[5], reason=f[6], elapsed=f[7], time_limit=f[8], time_left=f[9], nodes=f[10],
                        user=f[11], priority=prio, start_time=f[13]))
    return jobs


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o``: one line of Key=Value pairs (values may not contain spaces
    except in the last fields, which we do not use)."""
    out: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep:
            out[key] = value
    return out


def parse_duration(text: str) -> int | None:
    """Slurm's MM / MM:SS / HH:MM:SS / D-HH / D-HH:MM / D-HH:MM:SS to seconds; None for
    UNLIMITED / INVALID / N/A. After a day count the first number is hours, not minutes."""
    text = text.strip()
    if not text or text.upper() in ("UNLIMITED", "INVALID", "N/A", "NOT_SET", "INFINITE"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        h, m, s = ([int(p) for p in text.split(":")] + [0, 0])[:3]
        return days * 86400 + h * 3600 + m * 60 + s
    parts = [int(p) for p in text.split(":")]
    if len(parts) == 1:
        secs = parts[0] * 60
    elif len(parts) == 2:
        secs = parts[0] * 60 + parts[1]
    else:
        secs = parts[0] * 3600 + parts[1] * 60 + parts[2]
    return days * 86400 + secs


@dataclass
class Slurm:
    """The Slurm client commands, with an optional extra environment (e.g. ``SLURM_CONF``)."""

    env: Mapping[str, str] | None = None
    timeout: float = 60.0

    def _environ(self, scrub: bool = False) -> dict[str, str]:
        env = {**os.environ, **(self.env or {})}
        if scrub:
            env = scrub_secrets(env)
        return env

    def _run(self, cmd: Sequence[str], stdin: str | None = None, scrub: bool = False) -> str:
        exe = shutil.which(cmd[0], path=self._environ().get("PATH"))
        if exe is None:
            raise SlurmError(f"{cmd[0]} not found: is Slurm installed on this host and on the PATH?")
        try:
            proc = subprocess.run([exe, *cmd[1:]], input=stdin, capture_output=True, text=True,
                                  env=self._environ(scrub), timeout=self.timeout)
        except subprocess.TimeoutExpired as exc:
            raise SlurmError(f"{' '.join(cmd[:2])} timed out after {self.timeout:.0f} s (is slurmctld up?)") from exc
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip()
            raise SlurmError(f"{cmd[0]} failed (exit {proc.returncode}): {msg}")
        return proc.stdout

    # ------------------------------------------------------------------ sbatch
    def sbatch(self, script: str, options: Iterable[str] = ()) -> str:
        """Submit a batch script given as text; return the job id (the array's base id)."""
        out = self._run(["sbatch", "--parsable", *options], stdin=script, scrub=True).strip()
        # --parsable prints "jobid" or "jobid;cluster"
        job_id = out.split(";")[0].strip()
        if not job_id.isdigit():
            raise SlurmError(f"sbatch returned no job id: {out!r}")
        return job_id

    # ------------------------------------------------------------------ squeue
    def squeue(self, name_prefix: str | None = None, user: str | None = None, job_ids: Iterable[str] = ()) -> list[Job]:
        """Jobs in the queue, one entry per array task (``-r``), optionally filtered by name prefix."""
        cmd = ["squeue", "-h", "-r", "-o", SEP.join(_SQUEUE_FIELDS)]
        if user:
            cmd += ["-u", user]
        ids = list(job_ids)
        if ids:
            cmd += ["-j", ",".join(ids)]
        jobs = parse_squeue(self._run(cmd))
        if name_prefix is not None:
            jobs = [j for j in jobs if j.name.startswith(name_prefix)]
        return jobs

    # ------------------------------------------------------------------ scancel
    def signal(self, job_ids: Iterable[str], signal: str = "TERM", batch_only: bool = True) -> None:
        """Send a signal without cancelling: the job ends when its program exits.

        ``batch_only`` (``--batch``) reaches the batch shell, which the template ``exec``'s into
        the worker; otherwise ``--full`` signals every step too.
        """
        ids = list(job_ids)
        if not ids:
            return
        self._run(["scancel", f"--signal={signal}", "--batch" if batch_only else "--full", *ids])

    def cancel(self, job_ids: Iterable[str]) -> None:
        """Cancel outright: for pending tasks (they hold no work); running ones get TERM, then KILL
        after KillWait."""
        ids = list(job_ids)
        if ids:
            self._run(["scancel", *ids])

    # ------------------------------------------------------------------ scontrol
    def show_job(self, job_id: str) -> dict[str, str]:
        return parse_scontrol(self._run(["scontrol", "-o", "show", "job", job_id]))

    def show_jobs(self) -> list[dict[str, str]]:
        """Every job's ``scontrol -o show job`` fields (one line per job or started array task)."""
        out = self._run(["scontrol", "-o", "show", "job"])
        return [parse_scontrol(line) for line in out.splitlines() if line.strip() and "JobId=" in line]

    def show_nodes(self) -> list[dict[str, str]]:
        """Every node's ``scontrol -o show node`` fields (CfgTRES, AllocTRES, State, Partitions)."""
        return [parse_scontrol(line) for line in self._run(["scontrol", "-o", "show", "node"]).splitlines()
                if line.strip()]
