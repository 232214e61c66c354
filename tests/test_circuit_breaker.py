"""The circuit breaker against a real OpenSSH sshd and the real broker.

The sshd runs the real breaker configuration (chatai/devstack/sshd.py); the attackers are
asyncssh and the system ``ssh`` client holding the gateway's own key.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import secrets
import subprocess
import threading
from pathlib import Path

import aio_pika
import aiormq
import asyncssh
import pytest

from broker_config import topology
from circuit_breaker import hook
from circuit_breaker.breaker import Breaker
from chatai.devstack.sshd import LocalSshd
from support.waiting import wait_until

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


async def ssh_connect(sshd: LocalSshd, **kw) -> asyncssh.SSHClientConnection:
    opts = dict(username=sshd.user, client_keys=[str(sshd.client_key_path)], known_hosts=str(sshd.known_hosts_path),
                config=[], agent_path=None, connect_timeout=10)
    opts.update(kw)
    return await asyncssh.connect(sshd.host, sshd.port, **opts)


def attempts_with(b: Breaker, command: str) -> list[dict]:
    return [a for a in b.attempts() if a.get("command") == command]


def watch_enforced(sshd: LocalSshd) -> list[bool]:
    """What the watcher enforced on the broker (tripped or not), oldest first, from the event log."""
    events = [json.loads(line) for line in (sshd.state_dir / hook.EVENTS_LOG).read_text().splitlines() if line]
    return [e["tripped"] for e in events if e.get("event") == "enforced" and e.get("by") == "watch"]


def raw_log(sshd: LocalSshd) -> str:
    return (sshd.state_dir / hook.ATTEMPTS_LOG).read_text() + (sshd.state_dir / hook.EVENTS_LOG).read_text()


# -- the one allowed thing ------------------------------------------------------------------------

async def test_forward_to_broker_carries_amqp(sshd, breaker, gw_user):
    conn = await ssh_connect(sshd)
    try:
        listener = await conn.forward_local_port("127.0.0.1", 0, sshd.broker_host, sshd.broker_port)
        url = gw_user.url("127.0.0.1", listener.get_port())
        amqp = await aio_pika.connect(url)
        try:
            ch = await amqp.channel()
            q = await ch.declare_queue(gw_user.reply_queue(f"cbtest-{secrets.token_hex(3)}"),
                                       exclusive=True, auto_delete=True)
            await q.bind(topology.REPLIES_EXCHANGE, routing_key=q.name)
            assert q.declaration_result.message_count == 0
            requests = await ch.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
            ch2 = await amqp.channel(publisher_confirms=True)
            requests = await ch2.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
            # published and confirmed through the tunnel (no queue for this key: dropped, not an error)
            await requests.publish(aio_pika.Message(b"ping"), routing_key=f"nomodel-{secrets.token_hex(3)}")
        finally:
            await amqp.close()
    finally:
        conn.close()
        await conn.wait_closed()
    assert not breaker.status()["tripped"]


# -- everything else is refused --------------------------------------------------------------------

async def test_exec_runs_only_the_breaker_and_trips_it(sshd, breaker, tmp_path):
    """The command never runs; the record has the command name only, no arguments, no stdin."""
    name = f"cmd{secrets.token_hex(4)}"
    victim = tmp_path / "pwned"
    os.chmod(tmp_path, 0o777)  # the tunnel user could create it if the command ran
    proc = subprocess.run(sshd.ssh_command(remote=f"{name} SECRETARG-{name}; touch {victim}"),
                          input=f"STDIN-SECRET-{name}\n", capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert not victim.exists()
    # the breaker's message, unless the session was ended before sshd relayed it
    assert "circuit breaker is tripped" in proc.stderr or "closed by remote host" in proc.stderr
    await wait_until(lambda: attempts_with(breaker, name), what="attempt record")
    st = breaker.status()
    assert st["tripped"] and st["pending_trip"]
    (rec,) = attempts_with(breaker, name)
    assert rec["kind"] == "exec" and rec["client"] == "127.0.0.1" and rec["user"] == sshd.user
    assert rec["granted"] == {"pty": False, "agent": False, "x11": False}
    assert "SECRETARG" not in raw_log(sshd) and "STDIN-SECRET" not in raw_log(sshd)
    assert "SECRETARG" not in sshd.log_path.read_text()
    # Tripped: the same key no longer logs in at all.
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh_connect(sshd)


async def test_asyncssh_exec_refused(sshd, breaker):
    conn = await ssh_connect(sshd)
    name = f"cmd{secrets.token_hex(4)}"
    try:
        result = await asyncio.wait_for(conn.run(f"{name} --password=hunter2", input="payload"), 20)
        assert result.exit_status != 0 and "hunter2" not in result.stdout
    except (asyncssh.Error, OSError):
        pass  # the breaker ended the session before the exit status
    finally:
        conn.close()
    await wait_until(lambda: attempts_with(breaker, name), what="attempt record")
    assert breaker.status()["tripped"]
    assert "hunter2" not in raw_log(sshd)


async def test_shell_refused_and_trips(sshd, breaker):
    before = len(breaker.attempts())
    conn = await ssh_connect(sshd)
    try:
        proc = await conn.create_process()  # a shell: no command
        proc.stdin.write("touch /tmp/should-not-exist-cb\n")
        await asyncio.wait_for(proc.wait_closed(), 20)
    except (asyncssh.Error, OSError):
        pass
    finally:
        conn.close()
    await wait_until(lambda: len(breaker.attempts()) > before, what="attempt record")
    assert breaker.attempts()[-1]["kind"] == "shell"
    assert breaker.status()["tripped"]
    assert not Path("/tmp/should-not-exist-cb").exists()


async def test_sftp_refused_and_trips(sshd, breaker):
    before = len(breaker.attempts())
    conn = await ssh_connect(sshd)
    try:
        with pytest.raises((asyncssh.Error, OSError)):
            sftp = await asyncio.wait_for(conn.start_sftp_client(), 20)
            await sftp.listdir("/")
    finally:
        conn.close()
    await wait_until(lambda: len(breaker.attempts()) > before, what="attempt record")
    rec = breaker.attempts()[-1]
    assert rec["kind"] == "subsystem" and rec["command"] == "sftp-server"
    assert breaker.status()["tripped"]


async def test_forwarding_elsewhere_is_refused(sshd, breaker, broker):
    conn = await ssh_connect(sshd)
    try:
        # another port on the same host (sshd's own), another host, and the broker under another name
        for host, port in [("127.0.0.1", sshd.port), ("127.0.0.2", sshd.broker_port),
                           ("localhost", sshd.broker_port), ("10.255.255.1", 22)]:
            with pytest.raises(asyncssh.ChannelOpenError) as err:
                await conn.open_connection(host, port)
            assert err.value.code == asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, (host, port)
        # Unix socket forwarding
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_unix_connection("/run/sshd.pid")
        # The allowed one still works on the same connection.
        reader, writer = await conn.open_connection(sshd.broker_host, sshd.broker_port)
        writer.close()
    finally:
        conn.close()
    # No watcher runs here: the refusal itself is sshd's. (With the watcher, refused forwards trip
    # the breaker: tests/test_security_cluster.py.)
    assert not breaker.status()["tripped"]


async def test_remote_forwarding_is_refused(sshd, breaker):
    conn = await ssh_connect(sshd)
    try:
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_path(f"/tmp/cb-{secrets.token_hex(3)}.sock", "/tmp/x")
    finally:
        conn.close()
    proc = subprocess.run(sshd.ssh_command("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "remote port forwarding failed" in proc.stderr


async def test_pty_is_refused(sshd, breaker):
    conn = await ssh_connect(sshd)
    try:
        with pytest.raises(asyncssh.ChannelOpenError) as err:
            await conn.create_process(term_type="xterm")
        assert "PTY" in str(err.value.reason).upper()
    finally:
        conn.close()


async def test_agent_x11_and_pty_are_not_granted(sshd, breaker, tmp_path):
    """The system client asks for all three; the breaker's record shows none was granted."""
    agent_sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(agent_sock)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        await wait_until(agent_sock.exists, what="ssh-agent socket")
        name = f"cmd{secrets.token_hex(4)}"
        env = dict(os.environ, SSH_AUTH_SOCK=str(agent_sock), DISPLAY=":77")
        proc = subprocess.run(sshd.ssh_command("-A", "-X", "-tt", remote=name), env=env, capture_output=True,
                              text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0, proc.stderr
        # (the client may hang up before the breaker has written: wait for the record)
        (rec,) = await wait_until(lambda: attempts_with(breaker, name), what="attempt record")
        assert rec["granted"] == {"pty": False, "agent": False, "x11": False}
        assert breaker.status()["tripped"]
    finally:
        agent.terminate()
        agent.wait(5)


async def test_password_login_is_refused(sshd, breaker):
    # Only publickey is offered to the tunnel user, although the global config allows passwords.
    proc = subprocess.run(["ssh", "-F", "/dev/null", "-p", str(sshd.port), "-o", "BatchMode=yes",
                           "-o", f"UserKnownHostsFile={sshd.known_hosts_path}", "-o", "PubkeyAuthentication=no",
                           "-o", "PreferredAuthentications=password,keyboard-interactive",
                           f"{sshd.user}@{sshd.host}", "true"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 255 and "Permission denied (publickey)" in proc.stderr
    # Even with a real password on the account, a password login fails.
    password = secrets.token_urlsafe(12)
    subprocess.run(["chpasswd"], input=f"{sshd.user}:{password}\n", text=True, check=True)
    try:
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(sshd, client_keys=None, password=password, preferred_auth="password,keyboard-interactive")
    finally:
        subprocess.run(["usermod", "-p", "*", sshd.user], check=True)
    assert not breaker.status()["tripped"]


# -- trip, reset, and who may do what ---------------------------------------------------------------

async def test_trip_ends_live_sessions_and_refuses_logins_until_reset(sshd, breaker):
    conn = await ssh_connect(sshd)
    listener = await conn.forward_local_port("127.0.0.1", 0, sshd.broker_host, sshd.broker_port)
    # a live tunnel: a forwarded connection to the broker is open
    reader, writer = await asyncio.open_connection("127.0.0.1", listener.get_port())
    writer.write(b"AMQP\x00\x00\x09\x01")
    assert (await asyncio.wait_for(reader.read(8), 10))[:1] == b"\x01"  # connection.start frame
    breaker.trip(reason="test", by="test")
    await asyncio.wait_for(conn.wait_closed(), 10)
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh_connect(sshd)
    breaker.reset(by="test")
    conn = await ssh_connect(sshd)
    conn.close()


def _as_tunnel_user(sshd: LocalSshd, code: str) -> subprocess.CompletedProcess:
    return subprocess.run(["runuser", "-u", sshd.user, "--", "/usr/bin/python3", "-I", "-c", code],
                          capture_output=True, text=True, timeout=30)


async def test_tunnel_user_can_trip_but_never_reset(sshd, breaker):
    state = sshd.state_dir
    # The hook has no reset command at all.
    hook_prog = str(sshd.layout.hook)
    p = subprocess.run(["runuser", "-u", sshd.user, "--", hook_prog, "reset", "--config", str(sshd.config_path)],
                       capture_output=True, text=True)
    assert p.returncode == 2
    # Trip through the ForceCommand, then let root absorb the request.
    subprocess.run(sshd.ssh_command(remote="x"), capture_output=True, timeout=30)
    assert breaker.status()["tripped"]
    assert breaker.absorb()
    assert not (state / "trips" / "TRIPPED").exists()
    for code in [
        f"open({str(state / 'state.json')!r}, 'w').write('{{\"tripped\": false}}')",
        f"import os; os.unlink({str(state / 'state.json')!r})",
        f"import os; os.rename({str(state / 'state.json')!r}, {str(state / 'x.json')!r})",
        f"import os; os.listdir({str(state / 'trips')!r})",
        f"open({str(state / 'attempts.log')!r}).read()",
        f"open({str(state / 'events.log')!r}).read()",
        f"open({str(sshd.layout.keys_file)!r}, 'a').write('x')",
        f"open({str(sshd.layout.hook)!r}, 'a').write('x')",
    ]:
        r = _as_tunnel_user(sshd, code)
        assert r.returncode != 0 and "PermissionError" in r.stderr, code
    # Appending is allowed (that is how it records), truncating is not where chattr +a works.
    r = _as_tunnel_user(sshd, f"open({str(state / 'attempts.log')!r}, 'w')")
    lsattr = subprocess.run(["lsattr", str(state / "attempts.log")], capture_output=True, text=True).stdout
    if "a" in lsattr.split()[0]:
        assert r.returncode != 0
    assert breaker.status()["tripped"]
    with pytest.raises(asyncssh.PermissionDenied):
        await ssh_connect(sshd)


async def test_watch_enforces_an_automatic_trip_on_the_broker(sshd, breaker, broker, gw_user):
    """ForceCommand trips; the watcher shuts the gateway user out; workers and queued work stay."""
    gw_url, wk_url = gw_user.url(), broker.url("worker")
    marker = f"queued-{secrets.token_hex(4)}".encode()
    gw = await aio_pika.connect(gw_url)
    ch = await gw.channel(publisher_confirms=True)
    requests = await ch.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
    await requests.publish(aio_pika.Message(marker), routing_key="unserved")
    closed = asyncio.get_running_loop().create_future()
    gw.close_callbacks.add(lambda *a: closed.done() or closed.set_result(True))

    watcher = sshd.breaker(admin=broker.admin)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.watch, kwargs={"interval": 0.2, "stop": stop}, daemon=True)
    thread.start()
    try:
        subprocess.run(sshd.ssh_command(remote="id"), capture_output=True, timeout=30)
        await asyncio.wait_for(closed, 20)  # the gateway's broker connection was closed
        await wait_until(lambda: not (sshd.state_dir / "trips" / "TRIPPED").exists(), what="absorbed trip")
        assert json.loads((sshd.state_dir / "state.json").read_text())["tripped"] is True
        with pytest.raises((aiormq.exceptions.AMQPError, ConnectionError)):
            await aio_pika.connect(gw_url)
        # The worker still consumes, and the request queued before the trip is still there.
        wk = await aio_pika.connect(wk_url)
        try:
            wch = await wk.channel()
            q = await wch.get_queue(topology.model_queue("unserved"), ensure=False)
            found = False
            for _ in range(1000):
                msg = await q.get(timeout=5, fail=False, no_ack=False)
                if msg is None:
                    break
                if msg.body == marker:
                    await msg.ack()
                    found = True
                    break
            assert found
        finally:
            await wk.close()
        await wait_until(lambda: watch_enforced(sshd)[-1:] == [True], what="the watcher to record the trip")
        # Reset: the gateway user is back at once, nothing restarted.
        breaker.reset(by="test")
        await wait_until(lambda: not hook.is_tripped(str(sshd.state_dir)), what="reset")
        gw2 = await aio_pika.connect(gw_url)
        ch2 = await gw2.channel()
        await ch2.declare_queue(gw_user.reply_queue(f"cb-{secrets.token_hex(3)}"), exclusive=True)
        await gw2.close()
        # The watcher enforced the reset too (its latest enforcement, after the trip's).
        await wait_until(lambda: watch_enforced(sshd)[-1:] == [False], what="the watcher to enforce the reset")
    finally:
        stop.set()
        thread.join(10)
        if not gw.is_closed:
            await gw.close()


def test_cli_status_trip_reset(sshd, breaker, broker, gw_user):
    env = dict(os.environ, CHATAI_BREAKER_CONFIG=str(sshd.config_path))
    node = ["--rabbit-node", broker.admin.node] if broker.admin.node else []

    def chatai(*args):
        return subprocess.run(["chatai", "breaker", *args], env=env, capture_output=True, text=True, timeout=120)

    assert chatai("status").returncode == 0
    r = chatai("trip", "--reason", "cli test", *node)
    assert r.returncode == 0, r.stderr
    st = chatai("status", "--json")
    assert st.returncode == 1 and json.loads(st.stdout)["reason"] == "cli test"
    assert broker.admin.list_user_connections(gw_user.name) == []
    perms = subprocess.run(["rabbitmqctl", "-q", *(["-n", broker.admin.node] if broker.admin.node else []),
                            "list_user_permissions", gw_user.name, "--formatter", "json"],
                           capture_output=True, text=True).stdout
    assert topology.VHOST not in [p.get("vhost") for p in json.loads(perms or "[]")]
    assert chatai("reset", *node).returncode == 0
    assert chatai("status").returncode == 0
    perms = subprocess.run(["rabbitmqctl", "-q", *(["-n", broker.admin.node] if broker.admin.node else []),
                            "list_user_permissions", gw_user.name, "--formatter", "json"],
                           capture_output=True, text=True).stdout
    assert topology.VHOST in [p.get("vhost") for p in json.loads(perms)]


def test_state_fails_closed(tmp_path):
    (tmp_path / "trips").mkdir()
    assert hook.is_tripped(str(tmp_path))  # no state file
    (tmp_path / "state.json").write_text("{not json")
    assert hook.is_tripped(str(tmp_path))
    (tmp_path / "state.json").write_text('{"tripped": false}')
    assert not hook.is_tripped(str(tmp_path))
    (tmp_path / "trips" / "TRIPPED").write_text("")
    assert hook.is_tripped(str(tmp_path))


async def test_install_is_idempotent_and_scoped(sshd, breaker):
    """A second run of install.sh changes nothing, keeps the key, and the Match block does not leak."""
    snippet_before = sshd.layout.sshd_snippet.read_text()
    keys_before = sshd.layout.keys_file.read_text()
    r = subprocess.run([str(REPO / "circuit_breaker" / "install.sh"), "--prefix", str(sshd.base_dir),
                        "--sshd-config", str(sshd.layout.sshd_config), "--tunnel-user", sshd.user,
                        "--keys-user", sshd.keys_user, "--broker-host", sshd.broker_host,
                        "--broker-port", str(sshd.broker_port)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["snippet_changed"] is False
    assert sshd.layout.sshd_snippet.read_text() == snippet_before
    assert sshd.layout.keys_file.read_text() == keys_before
    assert keys_before.startswith(f'restrict,port-forwarding,permitopen="{sshd.broker_host}:{sshd.broker_port}" ')
    # Not locked, shell that can run the ForceCommand, root-owned home.
    shadow = {ln.split(":")[0]: ln.split(":")[1] for ln in Path("/etc/shadow").read_text().splitlines()}
    assert shadow[sshd.user] == "*"
    pw = pwd.getpwnam(sshd.user)
    assert pw.pw_shell == "/bin/sh" and os.stat(pw.pw_dir).st_uid == 0

    def effective(user: str) -> dict[str, str]:
        out = subprocess.run(["/usr/sbin/sshd", "-T", "-f", str(sshd.layout.sshd_config), "-C",
                              f"user={user},host=gw,addr=127.0.0.1"], capture_output=True, text=True, check=True).stdout
        return {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] if " " in ln else "" for ln in out.splitlines()}

    mine, other = effective(sshd.user), effective("root")
    assert f"exec {sshd.layout.hook} forced" in mine["forcecommand"] and mine["permitopen"] == \
        f"{sshd.broker_host}:{sshd.broker_port}"
    for key, value in {"allowtcpforwarding": "local", "permittty": "no", "x11forwarding": "no",
                       "allowagentforwarding": "no", "allowstreamlocalforwarding": "no", "gatewayports": "no",
                       "permittunnel": "no", "passwordauthentication": "no", "kbdinteractiveauthentication": "no",
                       "authenticationmethods": "publickey", "permituserrc": "no"}.items():
        assert mine[key] == value, key
    assert other.get("forcecommand", "none") == "none" and other["x11forwarding"] == "yes" and other["permitopen"] == "any"
    # The key still logs in after the re-run.
    conn = await ssh_connect(sshd)
    conn.close()


async def test_from_option_limits_the_key_to_the_gateway_address(sshd, breaker):
    """Re-running the installer with --from re-restricts the kept key; without it, back to normal."""
    from circuit_breaker.install import BreakerSpec, install

    cfg = json.loads(sshd.config_path.read_text())
    spec = dict(tunnel_user=sshd.user, keys_user=sshd.keys_user, broker_host=sshd.broker_host,
                broker_port=sshd.broker_port, rabbit_node=cfg["rabbit_node"], broker_user=cfg["broker_user"])
    try:
        install(BreakerSpec(from_="10.9.9.9", **spec), sshd.layout)
        assert ',from="10.9.9.9" ssh-ed25519 ' in sshd.layout.keys_file.read_text()
        with pytest.raises(asyncssh.PermissionDenied):
            await ssh_connect(sshd)  # we come from 127.0.0.1
    finally:
        install(BreakerSpec(**spec), sshd.layout)
    assert "from=" not in sshd.layout.keys_file.read_text()
    conn = await ssh_connect(sshd)
    conn.close()


async def test_invalid_sshd_config_is_rolled_back(sshd, breaker):
    from circuit_breaker.install import BreakerSpec, InstallError, install

    before = sshd.layout.sshd_snippet.read_text()
    spec = BreakerSpec(tunnel_user=sshd.user, keys_user=sshd.keys_user, broker_host="bad host",
                       broker_port=sshd.broker_port)
    with pytest.raises(InstallError):
        install(spec, sshd.layout)
    assert sshd.layout.sshd_snippet.read_text() == before


# -- least privilege behind the tunnel --------------------------------------------------------------

async def test_gateway_credentials_are_least_privilege(broker):
    gw = await aio_pika.connect(broker.url("gateway"))
    try:
        async def on_message(message) -> None:
            raise AssertionError("the gateway read a model queue")

        ch = await gw.channel()
        q = await ch.get_queue(topology.model_queue("tiny"), ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await q.consume(on_message)
        ch = await gw.channel()
        q = await ch.get_queue(topology.model_queue("tiny"), ensure=False)
        with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
            await q.get(timeout=5)  # basic.get on a model queue
        for name in ("evil.queue", topology.model_queue("evil"), "chatai.wk.fake.control"):
            ch = await gw.channel()
            with pytest.raises(aiormq.exceptions.ChannelAccessRefused):
                await ch.declare_queue(name, auto_delete=True)
        # Its own namespace works (the positive control).
        ch = await gw.channel()
        await ch.declare_queue(topology.gateway_reply_queue("gateway", f"cb-{secrets.token_hex(3)}"), exclusive=True)
    finally:
        await gw.close()
    other_vhost = f"amqp://gateway:{broker.passwords['gateway']}@{broker.host}:{broker.port}/%2F"
    with pytest.raises((aiormq.exceptions.AMQPError, ConnectionError)):
        await aio_pika.connect(other_vhost)


async def test_worker_credentials_cannot_publish_requests(broker):
    wk = await aio_pika.connect(broker.url("worker"))
    try:
        ch = await wk.channel(publisher_confirms=True)
        requests = await ch.get_exchange(topology.REQUESTS_EXCHANGE, ensure=False)
        with pytest.raises((aiormq.exceptions.ChannelAccessRefused, aiormq.exceptions.ChannelInvalidStateError)):
            await requests.publish(aio_pika.Message(b"x"), routing_key="tiny", timeout=10)
    finally:
        await wk.close()
