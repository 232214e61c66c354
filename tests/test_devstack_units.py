"""Issue 23 without services: several `chatai dev` stacks found apart, per-stack broker names,
whole ids at 80 columns, and what `scale up` / `scale down` say about Slurm's room."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from broker_config.definitions import Definitions
from broker_config.terminal import print_rows
from chatai import discovery
from chatai.cli import app, hoist_stack_option
from chatai.devstack.broker_names import BrokerTarget, StackNames
from slurm_jobs.capacity import NodeRoom, TaskRequest, gres_gpus, start_warnings
from slurm_jobs.cli import let_go_lines
from slurm_jobs.slurm import parse_scontrol


def _stack(state: Path, *, key: str = "sk-chatai-unit-test-key-0") -> Path:
    """A stack.json whose 'gateway' is this test process (alive while the test runs)."""
    state.mkdir(parents=True, exist_ok=True)
    (state / "broker-secrets.json").write_text(json.dumps({"op-x": "pw"}))
    path = state / "stack.json"
    path.write_text(json.dumps({"gateway_url": "http://127.0.0.1:9/v1", "api_key": key, "model": "tiny",
                                "pids": {"gateway": os.getpid()}, "broker_users": {"operator": "op-x"},
                                "broker_url": "amqp://gw-x:g@127.0.0.1:5999/chatai-x"}))
    return path


@pytest.fixture
def clean_env(tmp_path, monkeypatch):
    """No CHATAI_*/SLURM_* settings, a registry of our own, a folder without .chatai-dev; the
    environment as it was afterwards (the commands set defaults in it, as a CLI process may)."""
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith(("CHATAI_", "SLURM_"))]:
        del os.environ[key]
    (tmp_path / "run").mkdir()
    os.environ["XDG_RUNTIME_DIR"] = str(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    os.environ.clear()
    os.environ.update(saved)


def test_two_running_stacks_are_both_found_and_a_command_must_choose(clean_env):
    a, b = _stack(clean_env / "a", key="sk-chatai-key-of-stack-a"), _stack(clean_env / "b", key="sk-chatai-key-of-stack-b")
    entry_a, entry_b = discovery.publish(a), discovery.publish(b)
    assert entry_a != entry_b and {s.path for s in discovery.running_stacks()} == {a.resolve(), b.resolve()}
    with pytest.raises(discovery.StackChoiceError) as exc:
        discovery.find_stack()
    assert f"--stack {a.parent.resolve()}" in str(exc.value) and f"--stack {b.parent.resolve()}" in str(exc.value)

    runner = CliRunner()
    ambiguous = runner.invoke(app, ["status", "--json", "--listen", "0"])
    assert ambiguous.exit_code == 2 and "2 chatai dev stacks are running" in ambiguous.output
    for chosen, args in ((a, ["status", "--json", "--listen", "0", "--stack", str(a.parent)]),
                         (b, ["--stack", str(b.parent), "status", "--json", "--listen", "0"])):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["stack"] == str(chosen.resolve())
        del os.environ[discovery.STACK_ENV]  # the command pinned its choice for this process

    # Stopping one stack removes its own entry only; the other is then the only one.
    discovery.withdraw(a)
    assert not entry_a.exists() and entry_b.exists()
    assert discovery.find_stack().path == b.resolve()


def test_batch_commands_take_the_stacks_url_and_key_and_help_is_quiet(clean_env):
    discovery.publish(_stack(clean_env / "a", key="sk-chatai-key-of-stack-a"))
    for args in (["scale", "--help"], ["batch", "list", "--help"], ["autoscale", "--help"]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0 and "using the running" not in result.output, result.output
    discovery.apply_defaults("batch", client=True, quiet=True)
    assert os.environ["CHATAI_API_KEY"] == "sk-chatai-key-of-stack-a"
    assert os.environ["CHATAI_BASE_URL"] == "http://127.0.0.1:9"


def test_the_stack_option_moves_to_the_front_from_anywhere():
    assert hoist_stack_option(["status", "--json", "--stack", "/s"]) == ["--stack", "/s", "status", "--json"]
    assert hoist_stack_option(["breaker", "status", "--stack=/s"]) == ["--stack", "/s", "breaker", "status"]
    assert hoist_stack_option(["batch", "submit", "f", "--", "--stack", "x"]) == \
        ["batch", "submit", "f", "--", "--stack", "x"]


def test_an_operator_url_uses_the_stacks_own_operator_user(clean_env):
    info = discovery.load(_stack(clean_env / "a").parent)
    assert info.operator_url() == "amqp://op-x:pw@127.0.0.1:5999/chatai-x"


def test_stacks_on_a_shared_broker_get_names_of_their_own(tmp_path):
    a, b = StackNames.for_state_dir(tmp_path / "a"), StackNames.for_state_dir(tmp_path / "b")
    assert a == StackNames.for_state_dir(tmp_path / "a")  # stable across restarts
    assert not {a.vhost, *a.users().values()} & {b.vhost, *b.users().values()}
    assert "guest" not in a.users().values() and a.vhost != "chatai"
    doc = Definitions(models=["tiny"], passwords={a.gateway: "g", a.worker: "w", a.operator: "o"},
                      gateways=[a.gateway], vhost=a.vhost,
                      role_users={"worker": a.worker, "operator": a.operator}).render()
    assert {u["name"] for u in doc["users"]} == set(a.users().values())
    assert {p["vhost"] for p in doc["permissions"]} == {d["name"] for d in doc["vhosts"]} == {a.vhost}
    assert a.url("worker", "p/w", "h", 1).endswith(f"@h:1/{a.vhost}") and "p%2Fw" in a.url("worker", "p/w", "h", 1)


def test_the_broker_option_is_private_or_a_plain_amqp_address():
    assert BrokerTarget.parse("private") == BrokerTarget(shared=False)
    assert BrokerTarget.parse("amqp://10.0.0.5") == BrokerTarget(True, "10.0.0.5", 5672)
    assert BrokerTarget.parse("amqp://127.0.0.1:5673") == BrokerTarget(True, "127.0.0.1", 5673)
    for bad in ("auto", "system", "amqp://u:secret@h:5672", "amqp://h:5672/chatai", "http://h"):
        with pytest.raises(ValueError) as exc:
            BrokerTarget.parse(bad)
        assert "secret" not in str(exc.value)


def _text(headers, rows, width=80, **kw) -> str:
    console = Console(width=width, record=True, file=open(os.devnull, "w"))
    print_rows(console, headers, rows, **kw)
    return console.export_text()


def test_ids_are_whole_at_80_columns():
    rows = [[f"batch_{i:024x}", "in_progress", "10", "0", "10", "2026-12-03 10:11"] for i in (1, 2**90)]
    headers = ["id", "status", "completed", "failed", "total", "created"]
    for width in (80, 60, 200):
        text = _text(headers, rows, width, right=("completed", "failed", "total"))
        assert "…" not in text and all(r[0] in text and r[-1] in text for r in rows), text
    assert "┃" not in _text(headers, rows, 200) or "─" in _text(headers, rows, 200)  # a table when it fits


def test_help_never_cuts_option_names_at_80_columns():
    result = CliRunner().invoke(app, ["autoscale", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0
    assert "--release-pending-after" in result.output and "--backlog-per-worker" in result.output
    assert "…" not in result.output


SCONTROL_NODE = ("NodeName=dev Arch=x86_64 CoresPerSocket=1 CPUAlloc={alloc} CPUEfctv={cpus} CPUTot={cpus} "
                 "Gres=(null) NodeAddr=127.0.0.1 OS=Linux 6.1.0 #1 SMP RealMemory=4096 AllocMem=0 State={state} "
                 "Partitions=chatai CfgTRES=cpu={cpus},mem=4G,billing={cpus} AllocTRES={alloc_tres}")


def _node(cpus: int, alloc: int, state: str = "MIXED") -> NodeRoom:
    return NodeRoom.from_scontrol(parse_scontrol(SCONTROL_NODE.format(
        cpus=cpus, alloc=alloc, state=state, alloc_tres=f"cpu={alloc}" if alloc else "")))


def test_scale_up_warns_when_tasks_cannot_start():
    one_cpu = TaskRequest(cpus=1)
    # The dev node: 2 CPUs, one held by the stack's worker, two more asked for.
    (warning,) = start_warnings([_node(2, 1)], one_cpu, 2)
    assert "only 1 of 2 task(s)" in warning and "PENDING (Resources)" in warning
    assert start_warnings([_node(8, 1)], one_cpu, 2) == []  # the dev node as now declared
    never = start_warnings([_node(2, 0)], TaskRequest(cpus=4), 1)
    assert len(never) == 1 and "can ever start" in never[0] and "largest: dev with 2 CPU(s)" in never[0]
    assert "at most 2" in start_warnings([_node(2, 0)], one_cpu, 3)[-1]
    assert "no usable node" in start_warnings([_node(8, 0, "IDLE+DRAIN")], one_cpu, 1)[0]
    assert "no usable node" in start_warnings([_node(8, 0)], one_cpu, 1, partition="gpu")[0]
    gpu = NodeRoom("g", True, ("p",), {"cpu": 64, "gres/gpu": 4}, {"cpu": 2, "gres/gpu": 3})
    assert "only 1 of 2" in start_warnings([gpu], TaskRequest(cpus=1, gpus=1), 2)[0]
    assert gres_gpus("gpu:a100:2") == 2 and gres_gpus("gpu") == 1 and gres_gpus(None) == 0


def test_scale_down_says_what_it_did():
    assert let_go_lines("tiny", [], []) == ["no worker jobs of tiny to let go (none running or pending)"]
    cancelled, draining = let_go_lines("tiny", ["5_1"], ["3_0"])
    assert cancelled.startswith("cancelled 1 pending task(s) of tiny") and "5_1" in cancelled
    assert draining.startswith("draining 1 running worker(s) of tiny: 3_0")
    assert let_go_lines("tiny", ["5_1"], [])[0].startswith("cancelled")


def test_a_private_slurm_under_a_deep_directory_keeps_its_spool_where_step_sockets_fit(tmp_path):
    from chatai.devstack.slurm_cluster import LocalSlurmCluster

    short = Path(tempfile.mkdtemp(prefix="cs-"))  # /tmp/cs-xxxxxxxx: room enough for the sockets
    try:
        shallow = LocalSlurmCluster.create(base_dir=short, nodes=3)
        assert shallow.spool == short / "spool" and f"SlurmdSpoolDir={short / 'spool'}/%n" in shallow.render_conf()
    finally:
        shutil.rmtree(short)
    deep = LocalSlurmCluster.create(base_dir=tmp_path / ("d" * 60) / "slurm", nodes=8)
    try:
        # slurmstepd's socket for step 4294967291 (the batch step) of job 1234567 on the longest node name
        longest = max(len(n.name) for n in deep.nodes)
        socket_path = deep.spool / ("n" * longest) / f"{'n' * longest}_1234567.4294967291"
        assert len(str(socket_path)) <= 107 and deep.base_dir not in deep.spool.parents
        assert f"SlurmdSpoolDir={deep.spool}/%n" in deep.render_conf()
    finally:
        deep.stop()
    assert not deep.spool.exists()
