"""Slow and vanished clients: a client that stops reading a stream, and one that hangs up.

Promised: a client that takes no bytes never blocks the worker (it publishes to the broker
regardless) and holds gateway memory only for the gateway's send timeout: once one send has
waited ``CHATAI_GATEWAY_STREAM_SEND_TIMEOUT`` seconds, the gateway ends the stream and cancels
the generation, which frees the engine's slot. A client that disconnects frees its slot at once
(the time is printed, not asserted).

To fill the socket buffers (several MB on loopback), the stalled stream asks for 16 choices of
480 tokens with 20 top logprobs each: about 10 MB of events, and a receive buffer of 4 KiB.
"""

from __future__ import annotations

import json
import re
import socket
import time

import psutil
import pytest

from conftest import SERVED_MODEL
from support.faults import gateway_serving, metric, wait_for

SEND_TIMEOUT = 1.0
N, TOKENS = 16, 480
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]


@pytest.fixture
def send_timeout_gateway(broker, served_worker, tmp_path):
    env = {"CHATAI_GATEWAY_STREAM_SEND_TIMEOUT": str(SEND_TIMEOUT), "CHATAI_GATEWAY_QUEUE_TIMEOUT": "30",
           # The test's heavy streams (16 choices x 480 tokens x 21 logprobs) are over the default
           # logprobs budget on purpose; an operator raises it the same way.
           "CHATAI_GATEWAY_MAX_LOGPROB_TOKENS": "200000"}
    with gateway_serving(tmp_path / "gw", broker.url("gateway"), SERVED_MODEL, env=env) as gw:
        yield gw


def _in_flight(health: dict) -> int:
    """Requests the worker itself says it is generating (its heartbeat), -1 before one arrives."""
    return health["models"].get(SERVED_MODEL, {}).get("in_flight", -1)


def _completion_tokens(worker, request_id: str) -> int | None:
    """What the worker's log says it generated for a request, once it has finished with it."""
    lines = [ln for ln in worker.log_text().splitlines()
             if "completion_tokens=" in ln and f"request_id={request_id}" in ln]
    return int(re.search(r"completion_tokens=(\d+)", lines[-1]).group(1)) if lines else None


def _open_stalled_stream(gw, body: dict) -> tuple[socket.socket, str]:
    """POST a streamed request from a socket with a 4 KiB receive buffer; read up to the first
    event (the request id is in it), then read nothing more."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: sets the window
    sock.connect(("127.0.0.1", gw.port))
    payload = json.dumps(body).encode()
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {gw.api_key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    sock.settimeout(120)
    seen = b""
    while (m := re.search(rb'data: \{"id":"chatcmpl-([0-9a-f]+)"', seen)) is None:
        chunk = sock.recv(4096)
        assert chunk, seen[:500]
        seen += chunk
    assert seen.startswith(b"HTTP/1.1 200"), seen[:200]
    return sock, m.group(1).decode()


def test_a_client_that_reads_nothing_is_dropped_and_its_generation_cancelled(send_timeout_gateway, served_worker):
    gw = send_timeout_gateway
    gw.wait_for(lambda h: _in_flight(h) == 0, timeout=120, what="an idle worker")
    stalls_before = metric(gw.base_url, "chatai_stalled_streams_total")
    rss = psutil.Process(gw.proc.pid).memory_info().rss
    sock, request_id = _open_stalled_stream(gw, {
        "model": SERVED_MODEL, "messages": MESSAGES, "stream": True, "n": N, "max_tokens": TOKENS,
        "logprobs": True, "top_logprobs": 20, "ignore_eos": True})
    stalled_at = time.monotonic()
    try:
        # The worker is not blocked by the stalled reader: another request is served meanwhile.
        reply = gw.client(timeout=120).chat.completions.create(model=SERVED_MODEL, messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None
        wait_for(lambda: metric(gw.base_url, "chatai_stalled_streams_total") > stalls_before, 300,
                 "the gateway to give up the stalled stream")
        gave_up = time.monotonic() - stalled_at
        generated = wait_for(lambda: _completion_tokens(served_worker, request_id), 120,
                             "the worker to end the stalled request")
        gw.wait_for(lambda h: _in_flight(h) == 0, timeout=120, what="the worker's slots to be free")
        grown = psutil.Process(gw.proc.pid).memory_info().rss - rss
        print(f"\nstalled reader given up {gave_up:.1f} s after its last read (send timeout {SEND_TIMEOUT:.0f} s); "
              f"the worker generated {generated} of {N * TOKENS} tokens; gateway RSS grew {grown / 2**20:.1f} MiB")
        assert generated < N * TOKENS, "the generation ran to the end: the stalled stream was not cancelled"
        assert "stream ended, generation cancelled" in gw.log_text()
    finally:
        sock.close()
    assert gw.proc.poll() is None


def test_a_client_that_disconnects_frees_the_engine_slot(send_timeout_gateway, served_worker):
    gw = send_timeout_gateway
    gw.wait_for(lambda h: _in_flight(h) == 0, timeout=120, what="an idle worker")
    client = gw.client(timeout=120)
    with client.chat.completions.with_streaming_response.create(
            model=SERVED_MODEL, messages=MESSAGES, stream=True, max_tokens=TOKENS, n=N,
            extra_body={"ignore_eos": True}) as response:
        lines = response.iter_lines()
        first = next(line for line in lines if line.startswith("data:") and '"content"' in line)
        request_id = json.loads(first[5:])["id"].removeprefix("chatcmpl-")
        # One look, not a wait: waiting here would let the generation run on (and maybe finish).
        reported = _in_flight(gw.health()) >= 1
    left_at = time.monotonic()  # leaving the block closed the connection mid-stream
    gw.wait_for(lambda h: _in_flight(h) == 0, timeout=60, what="the worker to free the slot")
    freed = time.monotonic() - left_at
    generated = wait_for(lambda: _completion_tokens(served_worker, request_id), 60, "the worker's log line")
    print(f"\nengine slot free {freed * 1000:.0f} ms after the client hung up, as the worker's heartbeat shows "
          f"(it had reported the request before: {reported}; {generated} of {N * TOKENS} tokens generated)")
    assert generated < N * TOKENS, "the worker finished instead of aborting"
