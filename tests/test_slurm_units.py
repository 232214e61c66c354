"""Pure parts of the Slurm side: the autoscaler's decision, script rendering, squeue parsing."""

from __future__ import annotations

import os
import subprocess

import pytest

from slurm_jobs.autoscale import Decision, Observation, Policy, decide
from slurm_jobs.jobs import TemplateError, render_script, sbatch_directives
from slurm_jobs.settings import SlurmSettings
from slurm_jobs.slurm import SEP, Slurm, parse_duration, parse_squeue

P = Policy(min_workers=0, max_workers=3, backlog_per_worker=4, cooldown=60, release_pending_after=30)


def obs(**kw) -> Observation:
    base = dict(model="m", now=1000.0, ready=0, consumers=0, pending=0, running=0)
    base.update(kw)
    return Observation(**base)


def test_idle_model_stays_at_zero():
    assert decide(obs(), P) == Decision()


def test_backlog_from_zero_submits_one_worker_per_backlog_share_up_to_max():
    assert decide(obs(ready=1), P).submit == 1
    assert decide(obs(ready=8), P).submit == 2
    assert decide(obs(ready=100), P).submit == 3


def test_pending_and_loading_workers_count_as_coming_capacity():
    # two pending tasks already cover a backlog of 8
    assert decide(obs(ready=8, pending=2), P).submit == 0
    # a running task that does not consume yet (engine loading) counts as coming
    assert decide(obs(ready=8, running=1, consumers=0), P).submit == 1
    # a running consumer whose queue still grows needs help
    assert decide(obs(ready=8, running=1, consumers=1), P).submit == 2


def test_ceiling_and_cooldown():
    assert decide(obs(ready=50, running=3, consumers=3), P).submit == 0
    d = decide(obs(ready=50, running=1, consumers=1, last_submit_at=990.0), P)
    assert d.submit == 0 and "cooling" in d.reason
    assert decide(obs(ready=50, running=1, consumers=1, last_submit_at=900.0), P).submit == 2


def test_draining_workers_do_not_count():
    assert decide(obs(ready=4, running=1, consumers=1, draining=1), P).submit == 1


def test_floor_is_kept_without_backlog():
    floor = Policy(min_workers=2, max_workers=3)
    assert decide(obs(running=1, consumers=1), floor).submit == 1
    assert decide(obs(running=2, consumers=2), floor) == Decision()


def test_never_touches_running_workers_and_releases_pending_only_after_a_quiet_spell():
    assert decide(obs(running=3, consumers=3, queue_empty_since=0.0), P) == Decision()
    assert decide(obs(pending=2, queue_empty_since=990.0), P).cancel_pending == 0
    assert decide(obs(pending=2, queue_empty_since=900.0), P).cancel_pending == 2
    floor = Policy(min_workers=1, max_workers=3, release_pending_after=30)
    assert decide(obs(pending=2, queue_empty_since=900.0), floor).cancel_pending == 1


def test_bad_bounds_are_refused():
    with pytest.raises(ValueError):
        decide(obs(), Policy(min_workers=3, max_workers=2))


def test_rendered_script_is_backfill_friendly_and_keeps_secrets_off_the_command_line(tmp_path):
    s = SlurmSettings(time="01:00:00", time_min="00:10:00", qos="scavenger", nice=100, gres="gpu:1",
                      partition="gpu", cpus_per_task=8, mem="32G", requeue=True, signal_grace=120, drain_grace=60,
                      broker_url_file=tmp_path / "url", log_dir=tmp_path, worker_args="--max-num-seqs 8",
                      chatai="/opt/chatai/bin/chatai")
    script = render_script(s, "llama-3", "/models/llama 3")
    for line in ("#SBATCH --job-name=chatai-worker-llama-3", "#SBATCH --time=01:00:00", "#SBATCH --time-min=00:10:00",
                 "#SBATCH --signal=B:TERM@120", "#SBATCH --requeue", "#SBATCH --qos=scavenger", "#SBATCH --nice=100",
                 "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --cpus-per-task=8", "#SBATCH --mem=32G"):
        assert line in script
    assert "exec /opt/chatai/bin/chatai worker" in script
    assert "'/models/llama 3'" in script  # quoted
    assert "--drain-grace 60" in script and "--max-num-seqs 8" in script
    assert "amqp://" not in script
    assert "{{" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_drain_grace_must_fit_in_the_signal_warning(tmp_path):
    with pytest.raises(ValueError):
        SlurmSettings(signal_grace=30, drain_grace=30).check()


def test_unknown_placeholder_and_bad_model_name_are_errors(tmp_path):
    tmpl = tmp_path / "t.sbatch"
    tmpl.write_text("#!/bin/bash\n{{ nonsense }}\n")
    with pytest.raises(TemplateError):
        render_script(SlurmSettings(template=tmpl), "m", "/p")
    with pytest.raises(TemplateError):
        render_script(SlurmSettings(), "m; rm -rf /", "/p")
    assert "--no-requeue" in sbatch_directives(SlurmSettings(), "m")


def test_parse_squeue_and_durations():
    line = SEP.join(["12", "10", "2", "10_2", "chatai-worker-tiny", "RUNNING", "None", "1:02", "30:00",
                     "28:58", "vm-n0", "root", "4294901758", "2026-11-25T08:00:00"])
    (job,) = parse_squeue(line + "\n")
    assert job.job_id == "12" and job.array_task_id == "2" and job.display_id == "10_2" and job.running
    assert parse_duration("1-02:03:04") == 93784 and parse_duration("05:00") == 300
    assert parse_duration("UNLIMITED") is None
    # After a day count Slurm reads hours first: D-HH and D-HH:MM (sacct's Timelimit may be either).
    assert parse_duration("2-12") == 2 * 86400 + 12 * 3600 and parse_duration("1-00:30") == 86400 + 1800
    assert parse_duration("90") == 5400


class FakeSlurm:
    """Records calls; serves a fixed squeue (no Slurm needed for the drain order)."""

    def __init__(self, jobs):
        self._jobs = jobs
        self.cancelled: list[str] = []
        self.signalled: list[tuple[str, list[str], bool]] = []

    def squeue(self, name_prefix=None, **_):
        return [j for j in self._jobs if name_prefix is None or j.name.startswith(name_prefix)]

    def cancel(self, ids):
        self.cancelled += list(ids)

    def signal(self, ids, signal="TERM", batch_only=True):
        self.signalled.append((signal, list(ids), batch_only))


def _job(job_id, task, state):
    line = SEP.join([job_id, "10", task, f"10_{task}", "chatai-worker-tiny", state, "None", "0:01", "30:00",
                     "29:59", "vm", "root", "1", "N/A"])
    return parse_squeue(line)[0]


def test_scale_down_cancels_pending_first_then_terms_the_least_busy_and_never_kills():
    from slurm_jobs.jobs import WorkerJobs

    jobs = [_job("11", "1", "RUNNING"), _job("12", "2", "RUNNING"), _job("13", "3", "PENDING")]
    fake = FakeSlurm(jobs)
    gone = WorkerJobs(SlurmSettings(), fake).drain("tiny", 2, busy={"10_1": 3, "10_2": 0})
    assert fake.cancelled == ["10_3"]  # pending: nothing to drain
    assert fake.signalled == [("TERM", ["10_2"], True)]  # the idle one, by SIGTERM to the batch shell, by task id
    assert gone == ["10_3", "10_2"]
    fake = FakeSlurm(jobs)
    WorkerJobs(SlurmSettings(cancel_mode="full"), fake).drain("tiny", None)
    assert [(s, sorted(i), b) for s, i, b in fake.signalled] == [("TERM", ["10_1", "10_2"], False)]
    assert all(sig == "TERM" for sig, _, _ in fake.signalled)


def test_scale_down_addresses_the_task_never_the_array_base_id():
    """One task of an array carries the array's base id as its job id (here "10" for 10_3);
    `scancel 10` would reach every task of array 10, so the drain names the task: 10_3."""
    from slurm_jobs.jobs import WorkerJobs

    jobs = [_job("10", "3", "RUNNING"), _job("11", "1", "RUNNING")]
    fake = FakeSlurm(jobs)
    gone = WorkerJobs(SlurmSettings(), fake).drain("tiny", 1, busy={"10_1": 5})
    assert fake.signalled == [("TERM", ["10_3"], True)] and gone == ["10_3"]


def test_scrub_removes_secret_names_and_values_from_the_real_environment(monkeypatch):
    """Attack 9: what sbatch gets of the operator's environment (``Slurm._environ(scrub=True)``)."""
    secrets = ["DB_PASSWORD", "PGPASSWORD", "MYSQL_PWD", "APP_SECRET", "GH_TOKEN", "HF_TOKEN", "OPENAI_API_KEY",
               "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION",
               "AZURE_CLIENT_SECRET", "GOOGLE_APPLICATION_CREDENTIALS", "NPM_AUTH", "SSH_AUTH_SOCK",
               "CHATAI_WORKER_BROKER_URL", "DATABASE_URL", "SIGNING_KEY", "SLACK_WEBHOOK_PRIVATE_URL"]
    for name in secrets:
        monkeypatch.setenv(name, "s3cr3t")
    monkeypatch.setenv("PIP_INDEX_URL", "https://user:s3cr3t@pypi.example/simple")
    monkeypatch.setenv("CHATAI_WORKER_COALESCE_TOKENS", "16")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    env = Slurm(env={"SLURM_CONF": "/etc/slurm/slurm.conf"})._environ(scrub=True)
    assert not [k for k in env if k in secrets or "s3cr3t" in env[k]]
    for kept in ("PATH", "HOME", "SLURM_CONF", "CHATAI_WORKER_COALESCE_TOKENS", "TOKENIZERS_PARALLELISM"):
        assert kept in env or kept not in {**os.environ, "SLURM_CONF": ""}
