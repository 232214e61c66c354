"""Clients that read a stream slowly or not at all, against a real gateway and worker.

Promised: a client that stops reading never blocks the worker (other requests are served
meanwhile) and holds its generation only until ``CHATAI_GATEWAY_CLIENT_STALL_TIMEOUT``: then
the gateway drops it and the worker aborts the generation, freeing the engine slot; the
gateway keeps at most that one request's tokens meanwhile. A client that disconnects frees
the slot at once: tests/test_gateway_e2e.py::test_stream_disconnect_aborts_generation.
"""

from __future__ import annotations

import json
import re
import socket

import pytest

from conftest import SERVED_MODEL
from support.faults import gateway_serving, metric, wait_for

# Seconds. The stalled request must still be generating when it runs out: 7,680 tokens take
# seconds of CPU here (a slower machine only widens the gap).
STALL_TIMEOUT = 0.5
LONG = {"max_tokens": 480, "n": 16, "ignore_eos": True}  # 7,680 tokens, far more than socket buffers hold


@pytest.fixture
def stall_gateway(broker, served_worker, tmp_path):
    env = {"CHATAI_GATEWAY_CLIENT_STALL_TIMEOUT": str(STALL_TIMEOUT)}
    with gateway_serving(tmp_path / "gw", broker.url("gateway"), SERVED_MODEL, env=env) as gw:
        yield gw


def _stalled_stream(gw) -> tuple[socket.socket, str]:
    """Start a long stream with a tiny receive buffer, read up to its first chunk, then stop
    reading (the socket stays open). The request id."""
    body = json.dumps({"model": SERVED_MODEL, "stream": True, "messages": [{"role": "user", "content": "Go on."}],
                       **LONG}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {gw.api_key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    seen = b""
    while not (m := re.search(rb'"id":"chatcmpl-([0-9a-f]+)"', seen)):
        chunk = sock.recv(512)
        assert chunk, f"the gateway closed the stream early: {seen[:300]!r}"
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock, m.group(1).decode()


def _worker_outcome(worker, request_id: str) -> str | None:
    lines = [ln for ln in worker.log_text().splitlines()
             if f"request_id={request_id} " in ln and "completion_tokens=" in ln]
    return lines[-1] if lines else None


def test_client_that_stops_reading_is_dropped_and_the_generation_cancelled(stall_gateway, served_worker):
    gw = stall_gateway
    cancelled_before = metric(gw.base_url, "chatai_cancellations_total")
    sock, request_id = _stalled_stream(gw)
    try:
        # The worker is not blocked by the stalled reader: another request is served meanwhile.
        other = gw.client(timeout=120).chat.completions.create(
            model=SERVED_MODEL, messages=[{"role": "user", "content": "Quick one."}], max_tokens=4)
        assert other.choices[0].message.content is not None
        # After the stall timeout the gateway gives up on the reader and cancels the generation.
        wait_for(lambda: "a streaming client read nothing for" in gw.log_path.read_text(errors="replace"), 120,
                 "the gateway to drop the stalled reader")
        line = wait_for(lambda: _worker_outcome(served_worker, request_id), 60, "the worker to end the request")
        generated = int(re.search(r"completion_tokens=(\d+)", line).group(1))
        print(f"\nworker: {line.split(' - ')[-1] if ' - ' in line else line}")
        assert generated < LONG["max_tokens"] * LONG["n"], "the worker finished instead of aborting"
        assert metric(gw.base_url, "chatai_cancellations_total") > cancelled_before
        # Its engine slot is free again (the worker's own count), with the reader's socket still open.
        gw.wait_for(lambda h: h["models"].get(SERVED_MODEL, {}).get("in_flight", -1) == 0, timeout=30,
                    what="the worker's in-flight count to drop to zero")
    finally:
        sock.close()
