"""Operator commands without a cluster: options derived from settings, stack discovery, and the
one-line answers when a part is missing (no Slurm, no breaker, a malformed broker URL)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from broker_config.connection import check_url
from broker_config.settings_cli import settings_options
from chatai import discovery
from gpu_worker.settings import WorkerSettings
from slurm_jobs.settings import SlurmSettings


def _app(command) -> typer.Typer:
    app = typer.Typer()
    app.command()(command)
    app.command("noop")(lambda: None)  # two commands: the first is called by name
    return app


def test_settings_options_give_only_the_flags_used_and_settings_validate_them(monkeypatch):
    seen: dict[str, Any] = {}

    @settings_options(WorkerSettings, WorkerSettings.model_fields)
    def worker(overrides: dict[str, Any]) -> None:
        seen.update(overrides)
        seen["settings"] = WorkerSettings(**overrides)

    monkeypatch.setenv("CHATAI_WORKER_COALESCE_MS", "7")
    result = CliRunner().invoke(_app(worker), ["worker", "--engine", "synthetic", "--max-num-seqs", "3",
                                               "--no-enforce-eager", "--model", "/m/x"])
    assert result.exit_code == 0, result.output
    s = seen.pop("settings")
    assert seen == {"engine": "synthetic", "max_num_seqs": 3, "enforce_eager": False, "model": Path("/m/x")}
    assert s.coalesce_ms == 7 and s.engine == "synthetic"  # the environment still fills the rest
    bad = CliRunner().invoke(_app(worker), ["worker", "--engine", "gpt"])
    assert bad.exit_code == 2 and "gpt" in bad.output


def test_every_worker_setting_is_a_flag_with_its_fields_help():
    result = CliRunner().invoke(_app(settings_options(WorkerSettings, WorkerSettings.model_fields)(
        lambda overrides: None)), ["<lambda>", "--help"], env={"COLUMNS": "200"})
    for name, field in WorkerSettings.model_fields.items():
        assert "--" + name.replace("_", "-") in result.output
        assert field.description and field.description.split()[0] in result.output


def test_scale_up_flags_override_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATAI_SLURM_TIME", "01:00:00")
    monkeypatch.setenv("CHATAI_SLURM_MODELS", json.dumps({"tiny": "/models/tiny"}))
    from chatai.cli import app

    out = CliRunner().invoke(app, ["scale", "up", "-m", "tiny", "--dry-run", "--qos", "scavenger",
                                   "--time-min", "none", "--no-requeue"])
    assert out.exit_code == 0, out.output
    assert "#SBATCH --qos=scavenger" in out.output and "#SBATCH --time=01:00:00" in out.output
    assert "--time-min" not in out.output and "#SBATCH --no-requeue" in out.output


@pytest.mark.parametrize("url", ["notaurl", "amqp//op:pw@host", "http://op:pw@host/", "amqp://op:pw@host:port/x",
                                 "amqp:///chatai"])
def test_malformed_broker_urls_fail_at_once_without_echoing_them(url):
    with pytest.raises(ValueError) as exc:
        check_url(url)
    assert "pw" not in str(exc.value) and "malformed broker URL" in str(exc.value)


def test_a_good_broker_url_passes():
    assert check_url(" amqp://op:pw@127.0.0.1:5672/chatai\n") == "amqp://op:pw@127.0.0.1:5672/chatai"


def _stack(state: Path, pid: int, **extra: Any) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    (state / "broker-secrets.json").write_text(json.dumps({"operator": "op/pw", "gateway": "g"}))
    path = state / "stack.json"
    path.write_text(json.dumps({"gateway_url": "http://127.0.0.1:9/v1", "model": "tiny",
                                "model_path": "/models/tiny", "pids": {"gateway": pid},
                                "broker_url": "amqp://gateway:g@127.0.0.1:5999/chatai", **extra}))
    return path


def test_a_published_stack_is_found_and_becomes_the_operator_defaults(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    monkeypatch.setenv(discovery.STACK_ENV, "")  # none given (and restored after apply_defaults sets it)
    monkeypatch.chdir(tmp_path)
    stack_json = _stack(tmp_path / "somewhere", os.getpid(),
                        slurm={"SLURM_CONF": "/x/slurm.conf", "job_id": "1"}, tunnel={"breaker_config": "/x/b.json"})
    assert discovery.find_stack() is None
    entry = discovery.publish(stack_json)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600 and stat.S_IMODE(entry.parent.stat().st_mode) == 0o700
    found = discovery.find_stack()
    assert found is not None and found.path == stack_json.resolve()
    env = found.operator_env()
    assert env["CHATAI_SLURM_OPERATOR_BROKER_URL"] == "amqp://operator:op%2Fpw@127.0.0.1:5999/chatai"
    assert env["SLURM_CONF"] == "/x/slurm.conf" and env["CHATAI_BREAKER_CONFIG"] == "/x/b.json"
    assert json.loads(env["CHATAI_SLURM_MODELS"]) == {"tiny": "/models/tiny"}
    for key in env:  # monkeypatch restores them after the test
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("CHATAI_SLURM_CPUS_PER_TASK", "4")  # the operator's own setting wins
    discovery.apply_defaults("scale")
    assert "using the running chatai dev stack" in capsys.readouterr().err
    assert os.environ["CHATAI_SLURM_CPUS_PER_TASK"] == "4" and os.environ["SLURM_CONF"] == "/x/slurm.conf"
    assert SlurmSettings().models == {"tiny": "/models/tiny"}
    discovery.withdraw(stack_json)
    assert not entry.exists()


def test_a_stack_whose_processes_are_gone_is_ignored(tmp_path, monkeypatch):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # A `chatai dev` running on this machine must not count: its registry entry lives there.
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    dead_stack = _stack(tmp_path / "s", dead.pid)
    monkeypatch.chdir(tmp_path)
    discovery.publish(dead_stack)  # a killed stack's entry: ignored
    assert discovery.find_stack() is None
    monkeypatch.setenv(discovery.STACK_ENV, str(dead_stack.parent))  # named: an error that says so
    with pytest.raises(discovery.StackChoiceError, match="no running chatai dev stack"):
        discovery.find_stack()
    monkeypatch.setenv(discovery.STACK_ENV, "none")
    _stack(tmp_path / ".chatai-dev", os.getpid())
    assert discovery.find_stack() is None  # "none": never look
    monkeypatch.delenv(discovery.STACK_ENV)
    assert discovery.find_stack().path == (tmp_path / ".chatai-dev" / "stack.json").resolve()


def test_status_names_each_missing_part_in_one_line(tmp_path, monkeypatch):
    """No stack, no breaker, no Slurm configuration, a malformed broker URL: one line each,
    at once, exit 0 (status reports; it does not fail)."""
    from chatai.cli import app

    for key in [k for k in os.environ if k.startswith(("CHATAI_", "SLURM_"))]:
        monkeypatch.delenv(key)
    for key, value in dict(XDG_RUNTIME_DIR=str(tmp_path), CHATAI_STACK="none",
                           CHATAI_BREAKER_CONFIG=str(tmp_path / "no-breaker.json"),
                           CHATAI_SLURM_OPERATOR_BROKER_URL="amqp//operator:hunter2@host",
                           SLURM_CONF=str(tmp_path / "none.conf")).items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["stack"] is None and data["breaker"]["error"].startswith("not configured")
    assert data["gateway"]["error"].startswith("not configured")
    assert data["slurm_error"].startswith(("not configured", "not installed"))
    assert data["broker_error"].startswith("malformed broker URL")
    assert "hunter2" not in result.output
    text = CliRunner().invoke(app, ["status"], env={"COLUMNS": "200"}).output
    for line in ("breaker: not configured", "gateway: not configured", "slurm: not", "broker: malformed"):
        assert sum(ln.startswith(line) for ln in text.splitlines()) == 1, text
    assert "Traceback" not in text and "SRV" not in text and "hunter2" not in text


def test_generated_broker_passwords_never_start_with_a_dash(monkeypatch):
    """rabbitmqctl (and any other tool given one as an argument) would read it as an option."""
    import secrets

    from broker_config import definitions

    draws = iter(["-starts-with-a-dash", "-again", "fine-password"])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert definitions.new_password() == "fine-password"


def test_the_gateway_keeps_idle_connections_longer_than_the_openai_sdk_does():
    """The SDK's pool drops a connection idle for 5 s. A server that closes at the same age
    races a client reusing it, and that request fails with a connection error and no answer
    (seen as a 'broken' request in the tunnel-loss test); so the client must always close first."""
    from openai._constants import DEFAULT_CONNECTION_LIMITS

    from gateway.cli import uvicorn_options
    from gateway.settings import GatewaySettings

    options = uvicorn_options(GatewaySettings(broker_direct=True))
    assert options["timeout_keep_alive"] > DEFAULT_CONNECTION_LIMITS.keepalive_expiry
    assert uvicorn_options(GatewaySettings(broker_direct=True, keep_alive_timeout=90))["timeout_keep_alive"] == 90
