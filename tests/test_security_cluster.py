"""Attacks on the cluster side (issue 9: 2, 5 and 8), each against real processes.

* 2: the broker's ``guest`` account through the SSH tunnel, the vhost without limits, and the
  gateway's tunnel end usable by any local process;
* 5: one gateway deployment reading, purging or cancelling another's traffic on a shared broker;
* 8: probes that sshd refuses by itself (``ssh -L`` elsewhere, ``-D``, ``-R``, pty, X11, agent,
  env) and that did not trip the breaker.

Real RabbitMQ, a real OpenSSH sshd with the breaker's configuration, the real ``chatai``
commands, a real gateway process and a real vLLM worker.
"""

from __future__ import annotations

import asyncio
import configparser
import json
import os
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import threading
from pathlib import Path

import aio_pika
import aiormq
import asyncssh
import httpx
import psutil
import pytest

from broker_config import topology
from broker_config.messages import Final
from circuit_breaker import hook
from chatai.devstack.processes import free_port
from chatai.devstack.sshd import LocalSshd
from support.amqp_client import TestGatewayClient, sse_chunks
from support.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------- helpers

async def ssh_connect(sshd: LocalSshd, **kw) -> asyncssh.SSHClientConnection:
    opts = dict(username=sshd.user, client_keys=[str(sshd.client_key_path)], known_hosts=str(sshd.known_hosts_path),
                config=[], agent_path=None, connect_timeout=10)
    opts.update(kw)
    return await asyncssh.connect(sshd.host, sshd.port, **opts)


def chatai_broker_apply(broker, secrets_file: Path, *args: str) -> subprocess.CompletedProcess:
    node = ["--node", broker.admin.node] if broker.admin.node else []
    models = [a for m in broker.models for a in ("--model", m)]
    return subprocess.run(["chatai", "broker", "apply", *models, "--secrets", str(secrets_file), *node,
                           # the session's many test clients share the gateway user
                           "--gateway-max-connections", "256", "--gateway-max-channels", "4096", *args],
                          capture_output=True, text=True, timeout=180)


def secrets_file_with(path: Path, passwords: dict[str, str]) -> Path:
    """A broker secrets file that keeps the session's passwords (so apply changes none)."""
    path.write_text(json.dumps(passwords))
    path.chmod(0o600)
    return path


# ============================================================ attack 2: guest, limits, tunnel end

async def test_apply_deletes_guest_reachable_through_the_tunnel_and_sets_vhost_limits(broker, sshd, tmp_path):
    admin = broker.admin
    # The broker's factory default: guest/guest with every right on "/" (loopback only).
    if "guest" not in admin._run("list_users"):
        admin._run("add_user", "guest", "guest")
    admin._run("set_permissions", "-p", "/", "guest", ".*", ".*", ".*")
    conn = await ssh_connect(sshd)
    try:
        listener = await conn.forward_local_port("127.0.0.1", 0, sshd.broker_host, sshd.broker_port)
        guest_url = f"amqp://guest:guest@127.0.0.1:{listener.get_port()}/"
        # The attack: through the login node's forward the broker sees a loopback client.
        amqp = await aio_pika.connect(guest_url)
        ch = await amqp.channel()
        await ch.declare_queue(f"guest-was-here-{secrets.token_hex(3)}", auto_delete=True)
        await amqp.close()

        r = chatai_broker_apply(broker, secrets_file_with(tmp_path / "secrets.json", broker.passwords),
                                "--max-connections", "900", "--max-queues", "1900")
        assert r.returncode == 0, r.stderr
        assert "deleted the built-in 'guest' user" in r.stdout
        assert "guest" not in [u for u in admin.list_users()]
        with pytest.raises((aiormq.exceptions.AMQPConnectionError, ConnectionError)):
            await aio_pika.connect(guest_url)
        # Limits are in place and visible to the operator.
        out = subprocess.run(["rabbitmqctl", "-q", *(["-n", admin.node] if admin.node else []), "list_vhost_limits",
                              "-p", topology.VHOST], capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == {"max-connections": 900, "max-queues": 1900}
        # Applying again is idempotent and says so.
        r = chatai_broker_apply(broker, tmp_path / "secrets.json")
        assert r.returncode == 0 and "no 'guest' user to delete" in r.stdout
        assert admin.vhost_limits() == {"max-connections": 1000, "max-queues": 2000}  # the documented defaults
    finally:
        conn.close()
        broker.apply([])


def test_vhost_queue_limit_from_apply_refuses_beyond(broker, tmp_path):
    """The limit ``chatai broker apply`` sets is enforced: here one queue more than exist now."""
    async def scenario():
        amqp = await aio_pika.connect(broker.url("gateway"))
        try:
            r = chatai_broker_apply(broker, secrets_file_with(tmp_path / "secrets.json", broker.passwords),
                                    "--max-queues", str(len(broker.admin.list_queues()) + 1))
            assert r.returncode == 0, r.stderr
            ch = await amqp.channel()
            await ch.declare_queue(topology.gateway_reply_queue("gateway", f"lim-{secrets.token_hex(3)}"),
                                   exclusive=True)
            ch = await amqp.channel()
            with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed) as refused:
                await ch.declare_queue(topology.gateway_reply_queue("gateway", f"lim-{secrets.token_hex(3)}"),
                                       exclusive=True)
            assert "queue limit" in str(refused.value)
        finally:
            await amqp.close()
            broker.apply([])

    asyncio.run(scenario())


@pytest.fixture
def tunnel_gateway(sshd, gw_user, tmp_path):
    """A real ``chatai gateway`` that reaches the broker only through the SSH tunnel."""
    from support.gateway import start_gateway

    env = sshd.gateway_env()
    b = sshd.breaker()
    b.reset(by="test")
    gw = start_gateway(tmp_path / "tunnel-gw", gw_user.url("203.0.113.1", 9), extra_env=env,
                       direct=False)
    yield gw
    gw.stop()


def listening_sockets(pid: int) -> list:
    """Addresses another process could connect to: TCP listeners and named Unix sockets."""
    conns = psutil.Process(pid).net_connections(kind="all")
    return ([c.laddr for c in conns if c.family != socket.AF_UNIX and c.status == psutil.CONN_LISTEN]
            + [(c.laddr,) for c in conns if c.family == socket.AF_UNIX and c.laddr])


def test_no_local_process_can_use_the_gateways_tunnel(tunnel_gateway):
    """The gateway talks AMQP through the tunnel, yet listens on nothing but its HTTP port."""
    health = httpx.get(tunnel_gateway.base_url + "/health", timeout=5).json()
    assert health["tunnel"]["state"] == "up" and health["broker"]["connected"]
    listening = listening_sockets(tunnel_gateway.proc.pid)
    # TCP or Unix: nothing but the API. (Before: also 127.0.0.1:<port> of the tunnel's forward,
    # where any local process could log in to the broker.)
    assert [tuple(a)[:2] for a in listening] == [("127.0.0.1", tunnel_gateway.port)], listening


# ============================================================ attack 5: one broker, two deployments

@pytest.fixture(scope="module")
def two_deployments(broker, tmp_path_factory):
    """Two gateway deployments A and B made by ``chatai broker apply --gateway`` on the shared broker."""
    a, b = f"seca-{secrets.token_hex(3)}", f"secb-{secrets.token_hex(3)}"
    path = secrets_file_with(tmp_path_factory.mktemp("two") / "secrets.json", broker.passwords)
    r = chatai_broker_apply(broker, path, "--gateway", "gateway", "--gateway", a, "--gateway", b)
    assert r.returncode == 0, r.stderr
    passwords = json.loads(path.read_text())
    assert {k: passwords[k] for k in broker.passwords} == broker.passwords  # nothing else changed
    url = {u: f"amqp://{u}:{passwords[u]}@{broker.host}:{broker.port}/{topology.VHOST}" for u in (a, b)}
    yield a, b, url
    for u in (a, b):
        broker.admin.delete_user(u)


async def test_another_deployment_cannot_bind_to_our_replies(two_deployments, broker):
    a, b, url = two_deployments
    conn_a, conn_b = await aio_pika.connect(url[a]), await aio_pika.connect(url[b])
    try:
        ch = await conn_a.channel()
        mine = await ch.declare_queue(topology.gateway_reply_queue(a, "gw1"), exclusive=True)
        await mine.bind(topology.REPLIES_EXCHANGE, routing_key=mine.name)
        # B, on a queue of its own, asks for A's reply key, for every key, for every gateway's.
        for key in (mine.name, "#", "chatai.gw.#", f"chatai.gw.{a}.#", "chatai.gw.*.gw1.replies"):
            ch_b = await conn_b.channel()
            spy = await ch_b.declare_queue(topology.gateway_reply_queue(b, f"spy-{secrets.token_hex(2)}"),
                                           exclusive=True)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await spy.bind(topology.REPLIES_EXCHANGE, routing_key=key)
        # nor through an exchange of its own, nor by declaring a queue in A's namespace
        ch_b = await conn_b.channel()
        ex = await ch_b.declare_exchange(topology.gateway_namespace(b) + "x", aio_pika.ExchangeType.FANOUT,
                                         auto_delete=True)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ex.bind(topology.REPLIES_EXCHANGE, routing_key=mine.name)
        ch_b = await conn_b.channel()
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await ch_b.declare_queue(topology.gateway_reply_queue(a, "spy"), exclusive=True)
        # Its own keys work (the positive control).
        ch_b = await conn_b.channel()
        own = await ch_b.declare_queue(topology.gateway_reply_queue(b, "gw1"), exclusive=True)
        await own.bind(topology.REPLIES_EXCHANGE, routing_key=own.name)
    finally:
        await conn_a.close()
        await conn_b.close()


async def test_another_deployment_cannot_consume_or_purge_our_batch_results(two_deployments, broker):
    a, b, url = two_deployments
    results = topology.gateway_batch_results_queue(a, secrets.token_hex(8))
    conn_a, conn_b = await aio_pika.connect(url[a]), await aio_pika.connect(url[b])
    worker = await aio_pika.connect(broker.url("worker"))
    try:
        ch = await conn_a.channel()
        q = await ch.declare_queue(results, durable=True)
        await q.bind(topology.REPLIES_EXCHANGE, routing_key=results)
        wch = await worker.channel(publisher_confirms=True)
        replies = await wch.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
        await replies.publish(aio_pika.Message(b'{"a": "result"}'), routing_key=results)  # a worker answers A

        async def attempt(action):
            ch_b = await conn_b.channel()
            queue = await ch_b.get_queue(results, ensure=False)
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await action(queue)

        async def never(message) -> None:
            raise AssertionError("B read A's batch result")

        await attempt(lambda queue: queue.consume(never))
        await attempt(lambda queue: queue.get(timeout=5))
        await attempt(lambda queue: queue.purge())
        await attempt(lambda queue: queue.delete(if_unused=False, if_empty=False))
        # A's result is still there for A.
        msg = await (await conn_a.channel()).get_queue(results, ensure=False)
        got = await msg.get(timeout=5, fail=False)
        assert got is not None and got.body == b'{"a": "result"}'
        await got.ack()
    finally:
        ch = await conn_a.channel()
        await ch.queue_delete(results)
        for c in (conn_a, conn_b, worker):
            await c.close()


async def test_another_deployment_cannot_forge_our_user_id(two_deployments):
    """The broker checks user_id against the connection's user: a Cancel cannot claim A."""
    a, b, url = two_deployments
    conn_b = await aio_pika.connect(url[b])
    try:
        ch = await conn_b.channel(publisher_confirms=True)
        control = await ch.get_exchange(topology.CONTROL_EXCHANGE, ensure=False)
        with pytest.raises((aiormq.exceptions.ChannelPreconditionFailed, aiormq.exceptions.ChannelInvalidStateError)):
            await control.publish(aio_pika.Message(b'{"type": "cancel", "request_id": "x"}', user_id=a),
                                  routing_key="", timeout=10)
    finally:
        await conn_b.close()


async def test_a_cancel_from_another_deployment_is_ignored_by_the_worker(two_deployments, served_worker):
    a, b, url = two_deployments
    async with TestGatewayClient(url[a]) as gw_a, TestGatewayClient(url[b]) as gw_b:
        long = dict(max_tokens=400, ignore_eos=True, temperature=0.0)
        req = await gw_a.publish(gw_a.request(served_worker.model, **long))
        await gw_a.wait_for(lambda: len(gw_a.frames[req.request_id]) >= 3, timeout=60)  # started, head, data
        await gw_b.cancel(req.request_id)  # B knows (or guessed) A's request id
        frames = await gw_a.result(req.request_id, timeout=120)
        # Not aborted: it ran to its 400 tokens, and the worker says it refused B's cancel.
        assert isinstance(frames[-1], Final) and sse_chunks(frames)[-1]["choices"][0]["finish_reason"] == "length"
        assert frames[-1].usage.completion_tokens == 400
        await wait_until(lambda: f"ignored a cancel for request_id={req.request_id}" in served_worker.log_text(),
                         timeout=30, what="the worker to see and refuse B's cancel")
        # A's own cancel still works (positive control).
        req2 = await gw_a.publish(gw_a.request(served_worker.model, **long))
        await gw_a.wait_for(lambda: len(gw_a.frames[req2.request_id]) >= 3, timeout=60)
        await gw_a.cancel(req2.request_id)
        frames = await gw_a.result(req2.request_id, timeout=60)
        assert isinstance(frames[-1], Final) and frames[-1].aborted


def test_apply_replaces_an_old_direct_replies_exchange(tmp_path):
    """A broker set up before this fix has a direct chatai.replies, where topic permissions do
    nothing; an import would keep it. ``chatai broker apply`` replaces it."""
    from broker_config.admin import BrokerAdmin
    from broker_config.definitions import ROLES, Definitions, new_password
    from chatai.devstack.broker_node import LocalBrokerNode

    node = LocalBrokerNode.create(name="chatai-upgrade")
    node.start()
    try:
        admin = BrokerAdmin(node=node.node)
        passwords = {u: new_password() for u in ("gateway", "seca", "secb", *ROLES)}
        old = Definitions(models=["m"], passwords=passwords).render()
        for exchange in old["exchanges"]:
            if exchange["name"] == topology.REPLIES_EXCHANGE:
                exchange["type"] = "direct"
        admin.import_definitions(old)
        assert admin.exchange_types()[topology.REPLIES_EXCHANGE] == "direct"
        path = secrets_file_with(tmp_path / "secrets.json", passwords)
        r = subprocess.run(["chatai", "broker", "apply", "--model", "m", "--secrets", str(path), "--node", node.node,
                            "--gateway", "seca", "--gateway", "secb"], capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, r.stderr
        assert "replaced exchange chatai.replies (direct -> topic)" in r.stdout
        assert admin.exchange_types()[topology.REPLIES_EXCHANGE] == "topic"

        async def b_binds_a_key():
            conn = await aio_pika.connect(f"amqp://secb:{passwords['secb']}@127.0.0.1:{node.port}/{topology.VHOST}")
            try:
                ch = await conn.channel()
                spy = await ch.declare_queue(topology.gateway_reply_queue("secb", "spy"), exclusive=True)
                with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                    await spy.bind(topology.REPLIES_EXCHANGE, routing_key=topology.gateway_reply_queue("seca", "x"))
            finally:
                await conn.close()

        asyncio.run(b_binds_a_key())
    finally:
        node.stop()


def test_health_does_not_publish_the_gateway_id(tunnel_gateway):
    body = httpx.get(tunnel_gateway.base_url + "/health", timeout=5).text
    assert "gateway_id" not in body and topology.GATEWAY_QUEUE_PREFIX not in body
    assert json.loads(body)["broker"]["connected"] is True


# ============================================================ attack 8: every probe trips the breaker

@pytest.fixture
def watched(sshd, broker):
    """The breaker, reset, with its watcher (``chatai breaker watch``'s loop) following sshd's log."""
    b = sshd.breaker(admin=broker.admin)
    b.reset(by="test")
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=b.watch, kwargs={"interval": 0.2, "stop": stop, "ready": ready}, daemon=True)
    thread.start()
    assert ready.wait(30)
    yield b
    stop.set()
    thread.join(30)
    b.reset(by="test")


def socks5_connect(port: int, host: str, target_port: int) -> bytes:
    """A SOCKS5 CONNECT through ``ssh -D``; returns the proxy's reply (refused here)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"\x05\x01\x00")
        assert s.recv(2) == b"\x05\x00"
        s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(host) + struct.pack(">H", target_port))
        return s.recv(10)


def probe_with_client_forward(sshd: LocalSshd, option: str, use) -> None:
    """Run ``ssh -N <option>`` with the tunnel key, use the local end once, stop the client."""
    port = free_port()
    proc = subprocess.Popen(sshd.ssh_command("-N", option, option_arg(option, port, sshd)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def listening():
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return True
            except OSError:
                return proc.poll() is not None
        wait_until(listening, timeout=20, what="ssh's local listener")
        use(port)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def option_arg(option: str, port: int, sshd: LocalSshd) -> str:
    return f"{port}:127.0.0.1:22" if option == "-L" else str(port)


def raw_session(requests: list[tuple[bytes, tuple[bytes, ...]]]):
    """Open a session channel and send only these requests (no shell, no exec: no ForceCommand)."""
    from asyncssh.packet import String

    async def run(conn: asyncssh.SSHClientConnection) -> None:
        chan = asyncssh.SSHClientChannel(conn, asyncio.get_running_loop(), None, "utf-8", "strict",
                                         2 * 1024 * 1024, 32 * 1024)
        await chan._open(b"session")
        for name, args in requests:
            await chan._make_request(name, *[String(a) if isinstance(a, str) else a for a in args])
        chan.close()

    return run


ENV_SECRET = f"ENVSECRET{secrets.token_hex(6)}"


def _x11_args() -> tuple[bytes, ...]:
    from asyncssh.packet import Boolean, String, UInt32

    return (Boolean(False), String("MIT-MAGIC-COOKIE-1"), String(secrets.token_hex(16)), UInt32(0))


async def _probe_pty(conn):
    with pytest.raises(asyncssh.ChannelOpenError):
        await conn.create_process(term_type="xterm")  # pty refused: asyncssh never asks for a shell


SESSION_PROBES = {
    "pty": _probe_pty,
    "x11": lambda conn: raw_session([(b"x11-req", _x11_args())])(conn),
    "agent": lambda conn: raw_session([(b"auth-agent-req@openssh.com", ())])(conn),
    "env": lambda conn: raw_session([(b"env", ("LANG", ENV_SECRET))])(conn),
}


def assert_tripped_without_secrets(b, sshd: LocalSshd, expect: str) -> dict:
    st = wait_until(lambda: b.status()["tripped"] and b.status(), timeout=30, what="the breaker to trip")
    assert expect in st["reason"], st
    assert st["by"] == "sshd log"
    text = json.dumps(st) + (sshd.state_dir / hook.ATTEMPTS_LOG).read_text() + (sshd.state_dir / hook.EVENTS_LOG).read_text()
    assert ENV_SECRET not in text and ENV_SECRET not in sshd.log_path.read_text()
    return st


def assert_reset_restores_the_tunnel(b, sshd: LocalSshd, gw_user) -> None:
    # A trip's broker side may still be in progress in the watcher when the state says tripped;
    # the watcher re-applies whatever the state is, so the gateway user is back within a poll.
    b.reset(by="test")

    async def through_tunnel():
        conn = await ssh_connect(sshd)
        try:
            listener = await conn.forward_local_port("127.0.0.1", 0, sshd.broker_host, sshd.broker_port)
            try:
                amqp = await aio_pika.connect(gw_user.url("127.0.0.1", listener.get_port()))
            except aiormq.exceptions.AMQPError:
                return False
            await amqp.close()
            return True
        finally:
            conn.close()

    wait_until(through_tunnel, timeout=30, what="AMQP through the tunnel after the reset")
    assert not b.status()["tripped"]  # the legitimate forward trips nothing


@pytest.mark.parametrize("option", ["-L", "-D", "-R"])
def test_client_forward_probes_trip_the_breaker(option, watched, sshd, gw_user):
    if option == "-L":
        # ssh -L to the login node's port 22: sshd refuses the forward, the client's connection dies.
        probe_with_client_forward(sshd, "-L", lambda port: socket.create_connection(("127.0.0.1", port)).recv(10))
        expect = "refused a forward to 127.0.0.1:22"
    elif option == "-D":
        reply = []
        probe_with_client_forward(sshd, "-D", lambda port: reply.append(socks5_connect(port, "127.0.0.1", 22)))
        assert not reply[0].startswith(b"\x05\x00")  # the SOCKS CONNECT was refused
        expect = "refused a forward to 127.0.0.1:22"
    else:
        r = subprocess.run(sshd.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "remote port forwarding failed" in r.stderr
        expect = "tcpip-forward global request"
    assert_tripped_without_secrets(watched, sshd, expect)
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(ssh_connect(sshd))  # tripped: the key logs in no more
    assert_reset_restores_the_tunnel(watched, sshd, gw_user)


@pytest.mark.parametrize("probe", sorted(SESSION_PROBES))
def test_session_probes_trip_the_breaker_without_a_command(probe, watched, sshd, gw_user):
    before = len(watched.attempts())

    async def run():
        conn = await ssh_connect(sshd)
        try:
            await SESSION_PROBES[probe](conn)
        except (asyncssh.Error, OSError):
            pass  # the breaker may end the connection first
        finally:
            conn.close()

    asyncio.run(run())
    assert_tripped_without_secrets(watched, sshd, "session channel requested")
    names = {"pty": "pty-req", "x11": "x11-req", "agent": "auth-agent-req@openssh.com", "env": "env"}
    reasons = [a.get("reason", "") for a in watched.attempts()[before:]]
    assert f"sshd: {names[probe]} request on a channel" in reasons, reasons
    assert not any(a.get("event") == "forced-command" for a in watched.attempts()[before:])  # no command ran
    assert_reset_restores_the_tunnel(watched, sshd, gw_user)


def test_install_writes_the_watcher_unit_and_it_trips_on_probes(sshd, broker, gw_user):
    """``chatai breaker install`` writes a systemd unit; its ExecStart is a working watcher."""
    unit_path = sshd.layout.systemd_unit
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read_string(unit_path.read_text())
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert unit["Service"]["Restart"] == "always"
    argv = shlex.split(unit["Service"]["ExecStart"])
    assert Path(argv[0]).is_absolute() and os.access(argv[0], os.X_OK)
    assert argv[1:] == ["breaker", "watch", "--config", str(sshd.config_path)]
    assert json.loads(sshd.config_path.read_text())["sshd_log"] == str(sshd.log_path)
    b = sshd.breaker(admin=broker.admin)
    b.reset(by="test")
    # What systemd would run (it cannot run here: no systemd in this environment).
    watcher = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(iter(watcher.stderr.readline, "")), daemon=True)
        reader.start()
        wait_until(lambda: any("sshd's log" in ln for ln in lines), timeout=60,
                               what="the watcher to follow sshd's log")
        r = subprocess.run(sshd.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"),
                           capture_output=True, text=True, timeout=30)
        assert r.returncode != 0
        assert_tripped_without_secrets(b, sshd, "tcpip-forward global request")
        # The watcher shut the gateway's broker user out.
        wait_until(lambda: not broker.admin.list_user_connections(gw_user.name), timeout=30,
                               what="gateway connections closed")
    finally:
        watcher.terminate()
        watcher.wait(20)
    assert_reset_restores_the_tunnel(b, sshd, gw_user)
