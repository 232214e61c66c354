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

from broker_config.admin import BrokerAdmin
from chatai.devstack.broker_node import LocalBrokerNode
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
    """The per-user runtime folder both stacks of this module share (their registry lives there)."""
    path = state.parent / "run"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _operator(state: Path, *args: str, timeout: float = 120, stack: bool = True) -> subprocess.CompletedProcess:
    """A `chatai` command as from another shell: no CHATAI_*/SLURM_* settings, another folder; all
    it has is the per-user runtime folder where each `chatai dev` registered itself, and (with
    ``stack``) `--stack STATE`, since two stacks run at once."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHATAI_", "SLURM_"))}
    env["XDG_RUNTIME_DIR"] = str(_runtime_dir(state))
    return subprocess.run(["chatai", *args, *(["--stack", str(state)] if stack else [])], env=env,
                          cwd=state.parent, capture_output=True, text=True, timeout=timeout)


def _broker_snapshot(node: str | None = None) -> dict[str, list[str]] | None:
    """Users, vhosts and the default vhost's queues of a RabbitMQ node (read-only commands);
    None when there is no such node to ask."""
    out = {}
    for args in (["list_users"], ["list_vhosts", "name"], ["list_queues", "-p", "/", "name", "durable"]):
        proc = subprocess.run(["rabbitmqctl", "-q", *(["-n", node] if node else []), *args, "--formatter", "json"],
                              capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return None
        out[args[0]] = sorted(json.dumps(x, sort_keys=True) for x in json.loads(proc.stdout or "[]"))
    return out


@pytest.fixture(scope="module")
def shared_broker():
    """A RabbitMQ node that stands for a broker shared with others: a user and a vhost of
    someone else's, and guest, all of which a stack must leave as they are."""
    node = LocalBrokerNode.create(name="chatai-shared")
    node.start()
    admin = BrokerAdmin(node=node.node, vhost="someone-else")
    admin._run("add_vhost", "someone-else")
    admin._run("add_user", "someone", "their-password")
    admin._run("set_permissions", "-p", "someone-else", "someone", ".*", ".*", ".*")
    yield node
    node.stop()


# Two stacks at once, sharing one runtime folder (so each command must be told which): one as the
# README starts it (a private broker node, the key in the environment), one with its worker
# through Slurm on the shared broker above (the key from a file). The machine's own RabbitMQ
# (127.0.0.1:5672) must come out of it unchanged.
@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory, shared_broker):
    system_before = _broker_snapshot()
    shared_before = _broker_snapshot(shared_broker.node)
    started = {}
    for name, args in (("processes", []),
                       ("slurm", ["--slurm", "--broker", f"amqp://127.0.0.1:{shared_broker.port}",
                                  "--broker-node", shared_broker.node])):
        state = tmp_path_factory.mktemp(f"dev-{name}")
        key = "sk-chatai-test-" + uuid.uuid4().hex
        out = state.with_name(state.name + ".out")
        env = {"XDG_RUNTIME_DIR": str(_runtime_dir(state))}  # its own registry, not the user's
        key_args = []
        if name == "slurm":
            key_file = state.parent / f"dev-key-{name}"
            key_file.write_text(key + "\n")
            key_file.chmod(0o600)
            key_args = ["--api-key-file", str(key_file)]
        else:
            env["CHATAI_DEV_API_KEY"] = key
        dev = spawn(f"chatai dev ({name})", [sys.executable, "-m", "chatai.cli", "dev", "--state-dir", str(state),
                                             *key_args, "--port", str(free_port()), *args], out, env=env)
        started[name] = (dev, state, key, out, args)
    for dev, *_ in started.values():  # both load their workers at once
        try:
            dev.wait_until(lambda: "ready" in dev.log_text(), 400, f"{dev.name} to print ready", every=0.5)
        except (TimeoutError, ChildExited) as exc:
            for other, *_ in started.values():
                other.kill()
            pytest.fail(f"{dev.name} did not get ready ({exc}):\n{dev.log_text()[-3000:]}")
    yield {name: (dev.proc, state, key, out, args) for name, (dev, state, key, out, args) in started.items()}, \
        (system_before, shared_before, shared_broker.node)
    for dev, *_ in started.values():
        dev.kill()


@pytest.fixture(params=["processes", "slurm"])
def dev_stack(request: pytest.FixtureRequest, stacks):
    return stacks[0][request.param]


def _fleet(state: Path) -> dict:
    proc = _operator(state, "status", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _ready_jobs(data: dict) -> list[str]:
    return [j["job"] for j in data["jobs"] if j["model"] == "tiny" and j["worker_state"] == "ready"]


def test_operator_commands_find_the_running_stack_by_themselves(dev_stack):
    """Issues 12 and 23: with two stacks running, a command without --stack names both and asks;
    with --stack, `chatai status`, `breaker status`, `batch list` and (with --slurm) `scale
    up/down` work on that stack, and every live worker shows in the status view."""
    proc, state, key, out, args = dev_stack
    stack_json = (state / "stack.json").resolve()
    entries = {p.read_text().strip(): p for p in (_runtime_dir(state) / "chatai" / "dev-stacks").iterdir()}
    assert str(stack_json) in entries and stat.S_IMODE(entries[str(stack_json)].stat().st_mode) == 0o600
    if len(entries) == 2:  # both stacks run (they do, until the stop test below)
        ambiguous = _operator(state, "status", stack=False)
        assert ambiguous.returncode == 2 and "2 chatai dev stacks are running" in ambiguous.stderr
        assert f"--stack {state}" in ambiguous.stderr

    data = _fleet(state)
    assert data["stack"] == str(stack_json)
    assert data["breaker"]["error"] is None and data["breaker"]["tripped"] is False
    assert data["gateway"]["error"] is None and data["gateway"]["tunnel"]["state"] == "up"
    operator = json.loads(stack_json.read_text())["broker_users"]["operator"]
    assert data["broker_error"] is None and data["broker"].startswith(f"amqp://{operator}:***@")
    (tiny,) = [m for m in data["models"] if m["model"] == "tiny"]
    assert tiny["consumers"] >= 1 and tiny["workers_ready"] >= 1 and tiny["capacity"] > 0
    if "--slurm" in args:  # jobs of the stack's private Slurm, each joined with its heartbeat
        assert data["slurm_error"] is None and len(_ready_jobs(data)) == 1
    # Only this stack's worker: the other stack's is on another broker or vhost.
    assert [w["state"] for w in data["workers"] if w["model"] == "tiny"] in ([], ["ready"]), data["workers"]
    text = _operator(state, "status").stdout
    assert "breaker: closed" in text and "tunnel up" in text and "tiny" in text and "None" not in text

    breaker = _operator(state, "breaker", "status")
    assert breaker.returncode == 0 and "closed" in breaker.stdout, breaker.stderr + breaker.stdout
    assert f"using the running chatai dev stack {state}" in breaker.stderr
    batches = _operator(state, "batch", "list")  # the stack's URL and key, found by themselves
    assert batches.returncode == 0 and "status" in batches.stdout, batches.stderr + batches.stdout

    if "--slurm" not in args:
        return
    # One more worker beside the stack's own (one vLLM start-up keeps the suite's time down on 2
    # cores; tests/test_slurm.py's autoscaler test runs two workers of one model).
    up = _operator(state, "scale", "up", "--model", "tiny", "--workers", "1")
    assert up.returncode == 0 and "submitted array job" in up.stdout, up.stderr + up.stdout
    assert "warning" not in up.stderr, up.stderr  # the dev node has room for it
    deadline = time.monotonic() + 400
    while len(_ready_jobs(data)) < 2:  # each status call listens for the workers' heartbeats
        assert time.monotonic() < deadline, f"the new worker never showed as ready: {data}"
        data = _fleet(state)
    (tiny,) = [m for m in data["models"] if m["model"] == "tiny"]
    assert tiny["running"] == 2 and tiny["pending"] == 0 and tiny["workers_ready"] >= 2 and tiny["consumers"] >= 2
    down = _operator(state, "scale", "down", "--model", "tiny", "--workers", "1")
    assert down.returncode == 0 and "draining 1 running worker(s)" in down.stdout, down.stderr + down.stdout
    # The drained worker leaves and the other serves on. One status call listens for heartbeats
    # for a bounded time and may close before the other worker's next one: ask again.
    while len([j for j in data["jobs"] if j["model"] == "tiny"]) != 1 or len(_ready_jobs(data)) != 1:
        assert time.monotonic() < deadline + 120, f"the drained worker never left, or the other stopped: {data}"
        data = _fleet(state)


def test_dev_stack_serves_streams_and_stops_cleanly(dev_stack, stacks):
    proc, state, key, out, args = dev_stack
    system_before, shared_before, shared_node = stacks[1]
    printed = out.read_text(errors="replace")
    assert "streamed answer:" in printed and "ready" in printed

    stack_file = state / "stack.json"
    assert stat.S_IMODE(stack_file.stat().st_mode) == 0o600  # it holds the key and broker credentials
    stack = json.loads(stack_file.read_text())
    assert stack["api_key"] == key and stack["model"] == "tiny"
    users = stack["broker_users"]
    assert stack["broker_url"].startswith(f"amqp://{users['gateway']}:")
    if "--broker" in args:  # the shared broker: a vhost and users of this stack's own
        assert stack["broker_shared"] and stack["broker_vhost"].startswith("chatai-dev-")
        assert all(u.startswith("dev-") for u in users.values())
    else:  # a private node of its own, with the production names
        assert not stack["broker_shared"] and users["gateway"] == "gateway" and stack["broker_node"]
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
    registry = _runtime_dir(state) / "chatai" / "dev-stacks"
    left = [p.read_text().strip() for p in registry.iterdir()]
    assert str((state / "stack.json").resolve()) not in left  # its entry goes with the stack
    others = [name for name, (p, *_) in stacks[0].items() if p.poll() is None]
    assert len(left) == len(others)  # and only its own: a stack still running keeps its entry
    # Nothing changed on the machine's own RabbitMQ; on the shared one, the stack's vhost (its
    # queues with it) and users are gone and everything else (guest, someone else's) is as it was.
    assert _broker_snapshot() == system_before
    if "--broker" in args:
        assert _broker_snapshot(shared_node) == shared_before

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
