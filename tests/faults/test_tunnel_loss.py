"""Losing the SSH tunnel: the login node's sshd killed (and started again), and the tunnel's
SSH session cut while sshd stays up, each under live streams.

Promised: streams in flight end with a clear error event (or complete), never hang; while
the tunnel is down, ``/health`` shows it and why, and requests get 503 ``service_paused`` at
once; the gateway reconnects by itself with backoff (the same process) and serves again.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import openai
import pytest

from conftest import SERVED_MODEL
from support.faults import (
    Traffic,
    cut_tunnel_session,
    gateway_serving,
    metric,
    one_request,
    sshd_down,
    sshd_paused,
    wait_for,
)

# Long answers (8 choices of 400 tokens: seconds of decoding), so that streams are mid-flight
# whenever the fault comes.
LONG = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], max_tokens=400,
            n=8, extra_body={"ignore_eos": True})
SHORT = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Still there?"}], max_tokens=4)


@pytest.fixture
def tunnel_gateway(sshd, gw_user, served_worker, tmp_path):
    # A first reconnect delay of 4 s (2-4 s with jitter): the outage lasts long enough for a
    # /health poll to see it on a loaded machine; production starts at 0.5 s.
    env = {**sshd.gateway_env(), "CHATAI_GATEWAY_TUNNEL_KEEPALIVE": "2", "CHATAI_GATEWAY_QUEUE_TIMEOUT": "30",
           "CHATAI_GATEWAY_TUNNEL_BACKOFF_INITIAL": "4"}
    # The broker URL's host and port are never used: the gateway goes through the tunnel.
    with gateway_serving(tmp_path / "gw", gw_user.url("203.0.113.1", 9), SERVED_MODEL, env=env, direct=False) as gw:
        yield gw


def _serving(h: dict) -> bool:
    return h["broker"]["connected"] and h["tunnel"]["state"] == "up" and h["models"].get(SERVED_MODEL, {}).get("ready")


def _check(traffic: Traffic, since: float) -> None:
    print("traffic:", traffic.summary())
    assert traffic.count("hang") == 0 and traffic.count("broken") == 0, traffic.summary()
    in_flight = [o for o in traffic.outcomes if o.in_flight_at(since)]
    assert in_flight, "no stream was in flight when the tunnel went"
    assert all(o.kind in ("cut", "ok") for o in in_flight), [o.kind for o in in_flight]
    cut = [o for o in traffic.outcomes if o.kind == "cut"]
    refused = [o for o in traffic.outcomes if o.kind == "refused"]
    assert {o.code for o in cut + refused} <= {"service_paused"}, [o.code for o in cut + refused]
    assert all(o.status in (None, 503) and o.after >= since for o in cut + refused)


@contextlib.contextmanager
def _traffic_in_flight(gw) -> Iterator[tuple[Traffic, openai.OpenAI]]:
    """Three clients streaming long answers and one sending whole requests; handed out once a
    request has succeeded and a stream has tokens (a hang would surface as a client timeout)."""
    client = gw.client(timeout=120)
    with Traffic(client, streams=3, whole=1, **LONG) as traffic:
        wait_for(lambda: traffic.count("ok") >= 1, 180, "traffic before the fault")
        wait_for(lambda: traffic.streaming > 0, 120, "a stream with tokens in flight")
        yield traffic, client


def test_sshd_killed_and_restarted(tunnel_gateway, sshd):
    gw = tunnel_gateway
    pid = gw.proc.pid
    failures_before = metric(gw.base_url, "chatai_tunnel_connect_failures_total")
    with _traffic_in_flight(gw) as (traffic, client):
        down_at = time.monotonic()
        with sshd_down(sshd):
            health = gw.wait_for(lambda h: h["tunnel"]["state"] != "up" and not h["broker"]["connected"]
                                 and h["tunnel"]["last_error"], timeout=30, what="/health to show the outage")
            print(f"\n/health during the outage: tunnel {health['tunnel']}, status {health['status']}")
            assert health["status"] == "unavailable"
            outage = one_request(client, False, **SHORT)
            assert (outage.kind, outage.status, outage.code) == ("refused", 503, "service_paused")
            # Reconnect attempts fail while sshd is away: the gateway keeps trying, with backoff.
            wait_for(lambda: metric(gw.base_url, "chatai_tunnel_connect_failures_total") >= failures_before + 2,
                     60, "the gateway to retry the login node")
            down_for = time.monotonic() - down_at
            tries = metric(gw.base_url, "chatai_tunnel_connect_failures_total") - failures_before
        back_at = time.monotonic()
        gw.wait_for(_serving, timeout=90, what="the gateway to reconnect through the tunnel")
        print(f"{tries:.0f} failed attempts in {down_for:.1f} s down; serving {time.monotonic() - back_at:.1f} s "
              "after sshd came back")
        wait_for(lambda: [o for o in traffic.outcomes if o.kind == "ok" and o.after > back_at], 120,
                 "a request to succeed after sshd came back")
    _check(traffic, down_at)
    assert gw.proc.pid == pid and gw.proc.poll() is None


def test_ssh_session_cut_while_sshd_stays_up(tunnel_gateway, sshd):
    """The sshd processes of the gateway's own connection are killed (found by its ports); the
    listener stays up, so the gateway's next attempt, after its backoff, gets in.

    The listener is paused (SIGSTOP) from just before the cut until the test has seen the
    outage: without that, a retry that got in before a /health poll came round made the outage
    invisible (the poll then waited for a state that had come and gone)."""
    gw = tunnel_gateway
    pid = gw.proc.pid
    disconnects_before = metric(gw.base_url, "chatai_tunnel_disconnects_total")
    with _traffic_in_flight(gw) as (traffic, _):
        with sshd_paused(sshd):
            cut_at = time.monotonic()
            killed = cut_tunnel_session(sshd, pid)
            health = gw.wait_for(lambda h: h["tunnel"]["state"] != "up" and h["tunnel"]["last_error"],
                                 timeout=30, what="/health to show the outage and its reason")
            print(f"\nkilled sshd session processes {killed}; /health during the outage: tunnel {health['tunnel']}, "
                  f"broker connected {health['broker']['connected']}, status {health['status']}")
            assert health["status"] == "unavailable"
            wait_for(lambda: metric(gw.base_url, "chatai_tunnel_disconnects_total") > disconnects_before, 30,
                     "the gateway to count the lost tunnel")
        back = gw.wait_for(_serving, timeout=90, what="the gateway to reconnect through the tunnel")
        print(f"serving again {time.monotonic() - cut_at:.1f} s after the cut")
        assert back["tunnel"]["last_error"] is None
        wait_for(lambda: [o for o in traffic.outcomes if o.kind == "ok" and (o.first_token or 0) > cut_at], 180,
                 "a stream started after the cut to complete")
    _check(traffic, cut_at)
    assert gw.proc.pid == pid and gw.proc.poll() is None and sshd.process.poll() is None
