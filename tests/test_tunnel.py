"""The gateway's SSH tunnel manager against a real OpenSSH sshd (breaker config) and the broker.

Also the whole path: a ``chatai gateway`` process that reaches the broker only through the
tunnel answers through a real worker, answers 503 "paused" while the breaker is tripped, and
answers again after a reset, with no process restarted.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import time
from pathlib import Path

import aio_pika
import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from aiormq.exceptions import AMQPConnectionError

from broker_config import topology
from broker_config.connection import connect
from circuit_breaker import hook
from chatai.devstack.sshd import LocalSshd
from gateway.settings import GatewaySettings
from gateway.cluster.tunnel import BrokerTunnel
from support.waiting import wait_until


def make_tunnel(sshd: LocalSshd, **kw) -> BrokerTunnel:
    opts = dict(host=sshd.host, port=sshd.port, user=sshd.user, key_path=sshd.client_key_path,
                known_hosts_path=sshd.known_hosts_path, remote_host=sshd.broker_host,
                remote_port=sshd.broker_port, keepalive=2.0)
    opts.update(kw)
    return BrokerTunnel(**opts)


def sample(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# The URL's host and port are never used through the tunnel (an unroutable address proves it).
NOWHERE = ("203.0.113.1", 9)


async def test_tunnel_carries_amqp_and_reports_state(sshd, breaker, gw_user):
    tunnel = make_tunnel(sshd)
    try:
        await tunnel.start()
        assert await tunnel.wait_up(15), tunnel.last_error
        assert tunnel.state == "up" and tunnel.last_error is None
        assert sample("chatai_tunnel_up") == 1.0 and sample("chatai_tunnel_state", state="up") == 1.0
        before = sample("chatai_tunnel_forwarded_connections_total") or 0
        conn = await connect(gw_user.url(*NOWHERE), "test", transport=tunnel.transport())
        try:
            ch = await conn.channel()
            q = await ch.declare_queue(gw_user.reply_queue(f"tun-{secrets.token_hex(3)}"), exclusive=True)
            await q.bind(topology.REPLIES_EXCHANGE, routing_key=q.name)
        finally:
            await conn.close()
        assert sample("chatai_tunnel_forwarded_connections_total") == before + 1
    finally:
        await tunnel.close()
    assert tunnel.state == "down" and sample("chatai_tunnel_up") == 0.0
    assert not breaker.status()["tripped"]  # a legitimate tunnel never trips the breaker


async def test_wrong_or_unknown_host_key_is_refused(sshd, breaker, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{sshd.port} " + " ".join(other.with_suffix(".pub").read_text().split()[:2]) + "\n")
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    before = sample("chatai_tunnel_connect_failures_total", reason="host_key") or 0
    for known_hosts in (wrong, empty):
        tunnel = make_tunnel(sshd, known_hosts_path=known_hosts, backoff_initial=0.2, backoff_max=0.5)
        try:
            await tunnel.start()
            assert not await tunnel.wait_up(3)
            assert tunnel.state in ("connecting", "down")
            assert "host key" in (tunnel.last_error or "")
        finally:
            await tunnel.close()
    assert (sample("chatai_tunnel_connect_failures_total", reason="host_key") or 0) >= before + 2
    with pytest.raises(ValueError):
        make_tunnel(sshd, known_hosts_path=None)


async def test_tunnel_and_amqp_reconnect_after_a_drop(sshd, breaker, gw_user):
    tunnel = make_tunnel(sshd, backoff_initial=0.2)
    conn = None
    try:
        await tunnel.start()
        assert await tunnel.wait_up(15)
        conn = await connect(gw_user.url(*NOWHERE), "test", reconnect_interval=0.5, transport=tunnel.transport())
        back = asyncio.Event()
        conn.reconnect_callbacks.add(lambda *a: back.set())
        # The login node drops the connection (the session process dies).
        uid = __import__("pwd").getpwnam(sshd.user).pw_uid
        await wait_until(lambda: hook.processes_of(uid), timeout=15, what="the session's process")
        assert hook.end_sessions(uid) >= 1
        await wait_until(lambda: tunnel.connects >= 2 and tunnel.state == "up", timeout=15, what="reconnect")
        await asyncio.wait_for(back.wait(), 20)  # the robust AMQP connection came back through it
        ch = await conn.channel()
        await ch.declare_queue(gw_user.reply_queue(f"tun-{secrets.token_hex(3)}"), exclusive=True)
        assert (sample("chatai_tunnel_disconnects_total") or 0) >= 1
    finally:
        if conn is not None:
            await conn.close()
        await tunnel.close()


async def test_forward_the_login_node_refuses_is_reported(sshd, breaker):
    """A gateway configured for another broker address gets nothing, and says why."""
    tunnel = make_tunnel(sshd, remote_host="localhost")  # PermitOpen names 127.0.0.1 exactly
    try:
        await tunnel.start()
        assert await tunnel.wait_up(15)
        before = sample("chatai_tunnel_forward_failures_total") or 0
        with pytest.raises(AMQPConnectionError):
            await tunnel.open_stream()
        assert "refused" in (tunnel.last_error or "") and sample("chatai_tunnel_forward_failures_total") == before + 1
    finally:
        await tunnel.close()
    assert not breaker.status()["tripped"]


def test_from_settings(sshd):
    settings = GatewaySettings(tunnel_host=sshd.host, tunnel_port=sshd.port, tunnel_user=sshd.user,
                               tunnel_key=sshd.client_key_path, tunnel_known_hosts=sshd.known_hosts_path,
                               tunnel_remote_host="10.1.2.3", tunnel_remote_port=5671, tunnel_keepalive=7)
    t = BrokerTunnel.from_settings(settings)
    assert (t.host, t.port, t.user, t.remote_host, t.remote_port, t.keepalive) == \
        (sshd.host, sshd.port, sshd.user, "10.1.2.3", 5671, 7)
    assert t.known_hosts_path == sshd.known_hosts_path and t.key_path == sshd.client_key_path
    with pytest.raises(ValueError):
        BrokerTunnel.from_settings(GatewaySettings(tunnel_host=sshd.host, tunnel_key=sshd.client_key_path))


async def test_trip_shuts_the_tunnel_and_gateway_user_out_and_reset_brings_them_back(sshd, breaker, broker, gw_user):
    """Trip: live tunnel closed, logins refused, gateway user out, worker fine. Reset: all back."""
    tunnel = make_tunnel(sshd)
    gw = wk = None
    try:
        await tunnel.start()
        assert await tunnel.wait_up(15)
        gw = await connect(gw_user.url(*NOWHERE), "test", reconnect_interval=0.5, transport=tunnel.transport())
        lost, back = asyncio.Event(), asyncio.Event()
        gw.close_callbacks.add(lambda *a: lost.set())
        gw.reconnect_callbacks.add(lambda *a: back.set())
        ch = await gw.channel()
        await ch.declare_queue(gw_user.reply_queue(f"tun-{secrets.token_hex(3)}"), exclusive=True)

        await asyncio.to_thread(breaker.trip, "test trip", "test")
        await asyncio.wait_for(lost.wait(), 10)
        await wait_until(lambda: tunnel.state != "up", timeout=15, what="tunnel down")
        # New logins are refused while tripped: the tunnel keeps failing with "permission denied".
        await wait_until(lambda: "permission denied" in (tunnel.last_error or ""), timeout=15, what="login refused")
        assert tunnel.state != "up"
        # The gateway user cannot reach the vhost even without the tunnel.
        with pytest.raises(Exception):
            await aio_pika.connect(gw_user.url())
        # Workers are untouched.
        wk = await aio_pika.connect(broker.url("worker"))
        wch = await wk.channel()
        await wch.declare_queue(topology.worker_control_queue(f"tun-{secrets.token_hex(3)}"), exclusive=True)

        t0 = time.monotonic()
        await asyncio.to_thread(breaker.reset, "test")
        assert await tunnel.wait_up(15), tunnel.last_error
        await asyncio.wait_for(back.wait(), 20)  # the robust AMQP connection found its way back
        ch = await gw.channel()
        await ch.declare_queue(gw_user.reply_queue(f"tun-{secrets.token_hex(3)}"), exclusive=True)
        print(f"\nback {time.monotonic() - t0:.1f} s after the reset")  # each wait above has its own bound
    finally:
        for c in (gw, wk):
            if c is not None:
                await c.close()
        await tunnel.close()


def test_gateway_through_the_tunnel_pauses_on_trip_and_resumes_on_reset(sshd, breaker, broker, gw_user,
                                                                       served_worker, tmp_path):
    from support.gateway import start_gateway

    env = {
        **sshd.gateway_env(),
        "CHATAI_GATEWAY_TUNNEL_KEEPALIVE": "2", "CHATAI_GATEWAY_QUEUE_TIMEOUT": "30",
    }
    # The broker URL's host and port are never used: the gateway goes through the tunnel.
    gw = start_gateway(tmp_path / "gw", gw_user.url("203.0.113.1", 9), extra_env=env, direct=False)
    try:
        health = gw.wait_for(lambda h: h["models"].get("tiny", {}).get("ready", 0) >= 1, timeout=60,
                             what="the worker's heartbeat through the tunnel")
        assert health["tunnel"]["state"] == "up"
        client = gw.client(timeout=60)
        canary = f"CANARY-{secrets.token_hex(8)}"
        chat = dict(model="tiny", messages=[{"role": "user", "content": f"hello {canary}"}], max_tokens=4)
        assert client.chat.completions.create(**chat).choices[0].message.content is not None
        assert "tiny" in [m.id for m in client.models.list().data]
        gateway_pid, worker_pid = gw.proc.pid, served_worker.proc.pid

        breaker.trip(reason="test trip", by="test")
        health = gw.wait_for(lambda h: h["tunnel"]["state"] != "up" and not h["broker"]["connected"], timeout=20,
                             what="the gateway to notice the trip")
        with pytest.raises(openai.APIStatusError) as err:
            client.chat.completions.create(**chat)
        assert err.value.status_code == 503
        assert "paused" in err.value.message.lower()
        assert httpx.get(gw.base_url + "/health", timeout=5).status_code == 503
        # The model list does not pretend either (docs/api.md): the same 503, not a stale or empty list.
        for ask in (client.models.list, lambda: client.models.retrieve("tiny")):
            with pytest.raises(openai.APIStatusError) as err:
                ask()
            assert err.value.status_code == 503 and err.value.body["code"] == "service_paused"

        t0 = time.monotonic()
        breaker.reset(by="test")
        gw.wait_for(lambda h: h["broker"]["connected"] and h["tunnel"]["state"] == "up", timeout=30,
                    what="the gateway to come back")

        def answer():
            try:
                return client.chat.completions.create(**chat)
            except openai.APIStatusError:
                return None

        # It answers again (the worker's heartbeats may take a moment to arrive again).
        resp = wait_until(answer, 30, "the gateway to answer again", every=0.5)
        assert resp.choices[0].message.content is not None
        assert "tiny" in [m.id for m in client.models.list().data]
        print(f"\nanswering again {time.monotonic() - t0:.1f} s after the reset")  # bounded by the wait above
        assert gw.proc.poll() is None and gw.proc.pid == gateway_pid
        assert served_worker.proc.poll() is None and served_worker.proc.pid == worker_pid
    finally:
        gw.stop()
    log = Path(gw.log_path).read_text()
    assert gw_user.password not in log  # credentials never reach the log
    # No prompt text in any log on the path: gateway, sshd, breaker, worker, broker.
    broker_logs = sorted(broker.log_dir.glob("*.log")) if broker.log_dir else []
    assert broker_logs or broker.log_dir is None
    for path in (gw.log_path, sshd.log_path, sshd.state_dir / hook.ATTEMPTS_LOG, sshd.state_dir / hook.EVENTS_LOG,
                 served_worker.log_path, *broker_logs):
        assert canary not in Path(path).read_text(errors="replace"), path
