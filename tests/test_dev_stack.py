"""``chatai dev``, the project's main job, run exactly as the README runs it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow  # runs the whole `chatai dev` stack
from openai import OpenAI

from chatai.devstack.processes import ChildExited, free_port, spawn


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _cmdlines_holding(secret: str) -> list[str]:
    """Every process on the machine whose arguments (what ``ps`` shows anyone) contain ``secret``."""
    hits = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if secret.encode() in (entry / "cmdline").read_bytes():
                    hits.append(entry.name)
            except OSError:
                pass  # the process ended meanwhile
    return hits


def _runtime_dir(state: Path) -> Path:
    path = state.parent / (state.name + "-run")
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _operator(state: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """A `chatai` operator command as from another shell: no CHATAI_*/SLURM_* settings, another
    folder; all it has is the per-user runtime folder where `chatai dev` left its pointer."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATAI_", "SLURM_"))}
    env["XDG_RUNTIME_DIR"] = str(_runtime_dir(state))
    return subprocess.run(["chatai", *args], env=env, cwd=state.parent, capture_output=True, text=True,
                          timeout=timeout)


# The key reaches `chatai dev` as the README passes it (environment), or from a file.
# The Slurm stack gets a broker of its own: every private Slurm numbers its jobs from 1, so on a
# shared broker another stack's worker for "job 1_0" would answer for this one's.
@pytest.fixture(scope="module", params=[[], ["--slurm", "--broker", "private"]], ids=["processes", "slurm"])
def dev_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    state = tmp_path_factory.mktemp("dev-state")
    key = "sk-chatai-test-" + uuid.uuid4().hex
    port = free_port()
    out = state.with_name(state.name + ".out")  # one per parameter: spawn appends
    env = {"XDG_RUNTIME_DIR": str(_runtime_dir(state))}  # its own pointer file, not the user's
    key_args = []
    if "--slurm" in request.param:
        key_file = state.parent / "dev-key"
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
        key_args = ["--api-key-file", str(key_file)]
    else:
        env["CHATAI_DEV_API_KEY"] = key
    dev = spawn("chatai dev", [sys.executable, "-m", "chatai.cli", "dev", "--state-dir", str(state), *key_args,
                               "--port", str(port), *request.param], out, env=env)
    try:
        dev.wait_until(lambda: "ready" in dev.log_text(), 300, "chatai dev to print ready", every=0.5)
    except (TimeoutError, ChildExited) as exc:
        dev.kill()
        pytest.fail(f"chatai dev did not get ready ({exc}):\n{dev.log_text()[-3000:]}")
    yield dev.proc, state, key, out, request.param
    dev.kill()


def _fleet(state: Path) -> dict:
    proc = _operator(state, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ready_jobs(data: dict) -> list[str]:
    return [j["job"] for j in data["jobs"] if j["model"] == "tiny" and j["worker_state"] == "ready"]


def test_operator_commands_find_the_running_stack_by_themselves(dev_stack):
    """Issue 12: `chatai status`, `breaker status` and (with --slurm) `scale up/down` work on the
    running stack with no flags, and every live worker shows in the status view."""
    proc, state, key, out, args = dev_stack
    pointer = _runtime_dir(state) / "chatai" / "dev-stack"
    assert stat.S_IMODE(pointer.stat().st_mode) == 0o600
    assert pointer.read_text().strip() == str((state / "stack.json").resolve())

    data = _fleet(state)
    assert data["stack"] == str((state / "stack.json").resolve())
    assert data["breaker"]["error"] is None and data["breaker"]["tripped"] is False
    assert data["gateway"]["error"] is None and data["gateway"]["tunnel"]["state"] == "up"
    assert data["broker_error"] is None and data["broker"].startswith("amqp://operator:***@")
    (tiny,) = [m for m in data["models"] if m["model"] == "tiny"]
    assert tiny["consumers"] >= 1 and tiny["workers_ready"] >= 1 and tiny["capacity"] > 0
    if "--slurm" in args:  # jobs of the stack's private Slurm, each joined with its heartbeat
        assert data["slurm_error"] is None and len(_ready_jobs(data)) == 1
    else:  # (the system RabbitMQ, when the stack uses it, may carry other stacks' workers too)
        assert [w for w in data["workers"] if w["model"] == "tiny" and w["state"] == "ready"], data["workers"]
    text = _operator(state, "status").stdout
    assert "breaker: closed" in text and "tunnel up" in text and "tiny" in text

    breaker = _operator(state, "breaker", "status")
    assert breaker.returncode == 0 and "closed" in breaker.stdout, breaker.stderr + breaker.stdout
    assert "using the running chatai dev stack" in breaker.stderr

    if "--slurm" not in args:
        return
    up = _operator(state, "scale", "up", "--model", "tiny", "--workers", "1")
    assert up.returncode == 0 and "submitted array job" in up.stdout, up.stderr + up.stdout
    deadline = time.monotonic() + 300
    while len(_ready_jobs(data)) < 2:  # each status call listens for the workers' heartbeats
        assert time.monotonic() < deadline, f"the second worker never showed as ready: {data}"
        data = _fleet(state)
    (tiny,) = [m for m in data["models"] if m["model"] == "tiny"]
    assert tiny["running"] == 2 and tiny["workers_ready"] >= 2 and tiny["consumers"] >= 2
    down = _operator(state, "scale", "down", "--model", "tiny", "--workers", "1")
    assert down.returncode == 0 and "draining 1 worker(s)" in down.stdout, down.stderr + down.stdout
    while len([j for j in data["jobs"] if j["model"] == "tiny"]) != 1:
        assert time.monotonic() < deadline + 120, f"the drained worker never left: {data}"
        data = _fleet(state)
    assert len(_ready_jobs(data)) == 1  # the other worker serves on


def test_dev_stack_serves_streams_and_stops_cleanly(dev_stack):
    proc, state, key, out, args = dev_stack
    printed = out.read_text(errors="replace")
    assert "streamed answer:" in printed and "ready" in printed

    stack_file = state / "stack.json"
    assert stat.S_IMODE(stack_file.stat().st_mode) == 0o600  # it holds the key and broker credentials
    stack = json.loads(stack_file.read_text())
    assert stack["api_key"] == key and stack["model"] == "tiny"
    assert stack["broker_url"].startswith("amqp://gateway:")
    # The gateway reaches the broker only through the SSH tunnel to a local sshd with the breaker.
    tunnel = stack["tunnel"]
    assert tunnel["user"] and tunnel["port"] and Path(tunnel["known_hosts"]).exists()
    health = httpx.get(stack["gateway_url"].removesuffix("/v1") + "/health").json()
    assert health["tunnel"]["state"] == "up" and health["broker"]["connected"]
    pids = list(stack["pids"].values())
    assert pids and all(_alive(pid) for pid in pids)
    # Attack 9: the key is in no process's arguments (ps), and the children do not inherit it.
    assert not _cmdlines_holding(key), "the API key is visible in ps"
    for pid in pids:
        assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    if "--slurm" in args:
        # The worker is an array job of the stack's private Slurm, not a child process.
        assert "worker" not in stack["pids"]
        env = {**os.environ, "SLURM_CONF": stack["slurm"]["SLURM_CONF"]}
        squeue = subprocess.run(["squeue", "-h", "-o", "%i %j %T"], env=env, capture_output=True, text=True,
                                check=True).stdout
        assert stack["slurm"]["job_id"] in squeue and "chatai-worker-tiny" in squeue and "RUNNING" in squeue

    canary = "CANARY-" + uuid.uuid4().hex
    client = OpenAI(base_url=stack["gateway_url"], api_key=key, max_retries=0)
    stream = client.chat.completions.create(model="tiny", stream=True, max_tokens=8,
                                            messages=[{"role": "user", "content": f"remember {canary}"}])
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0
    assert "stopped" in out.read_text(errors="replace")
    assert not [pid for pid in pids if _alive(pid)], "a child of chatai dev outlived it"
    assert not (_runtime_dir(state) / "chatai" / "dev-stack").exists()  # the pointer goes with the stack

    # Privacy: the prompt appears in none of the stack's logs.
    log_dirs = [Path(stack["logs"])] + ([Path(stack["slurm"]["worker_logs"])] if "slurm" in stack else [])
    logs = [p for d in log_dirs for p in d.rglob("*") if p.is_file()] + [out]
    assert logs
    for path in logs:
        assert canary not in path.read_text(errors="replace"), f"prompt text leaked into {path}"


def test_api_key_flag_is_deprecated_with_a_warning_and_checked_before_anything_starts(tmp_path):
    """The old ``--api-key`` still works but says why not to use it; a bad key stops at once."""
    state = tmp_path / "state"
    proc = subprocess.run([sys.executable, "-m", "chatai.cli", "dev", "--state-dir", str(state),
                           "--api-key", "too-short"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "--api-key is deprecated" in proc.stderr and "CHATAI_DEV_API_KEY" in proc.stderr
    assert "at least 16 characters" in proc.stderr
    assert not state.exists()  # nothing was started
