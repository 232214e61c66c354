"""Attacks on the gateway's HTTP and batch side (issue 9: attacks 1, 3, 4, 6 and 7).

Each test is an attack that worked against the gateway before its fix, run against real
processes: a ``chatai gateway`` of this module's own, the session's RabbitMQ and its real vLLM
worker. Raw sockets and httpx send what the OpenAI SDK cannot (chunked bodies that never end);
everything else goes through the official SDK.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import httpx
import openai
import pytest

from broker_config import topology
from broker_config.connection import user_of
from broker_config.messages import CONTENT_TYPE, Final, Usage
from conftest import SERVED_MODEL
from support.gateway import GatewayProcess, gateway_serving, new_key
from support.waiting import wait_until

CHAT = "/v1/chat/completions"
METRICS_TOKEN = "metrics-" + secrets.token_hex(16)
MAX_FILE_BYTES = 1024 * 1024
MB = 1024 * 1024
HUGE = 300 * MB  # the attack: far more than the gateway may ever hold
MAX_GROWTH = 100 * MB  # generous: the fixed gateway holds a few MB of it at most


@pytest.fixture(scope="module")
def sgw(broker, served_worker, tmp_path_factory) -> Iterator[GatewayProcess]:
    state_dir = tmp_path_factory.mktemp("sec-gateway") / "state"
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)  # as an operator's mkdir under umask 022 leaves it
    with gateway_serving(state_dir, broker.url("gateway"), SERVED_MODEL,
                         env={"CHATAI_GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
                              "CHATAI_GATEWAY_BATCH_MAX_FILE_BYTES": str(MAX_FILE_BYTES),
                              "CHATAI_GATEWAY_BATCH_TICK": "0.2",
                              "CHATAI_GATEWAY_QUEUE_TIMEOUT": "60"}) as gw:
        yield gw


@pytest.fixture(scope="module")
def other_client(sgw) -> openai.OpenAI:
    """A second API key's client (another user of the same gateway)."""
    key = new_key(sgw, "other user")[1]
    return openai.OpenAI(base_url=sgw.base_url + "/v1", api_key=key, max_retries=0)


# ---------------------------------------------------------------------------------- helpers


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def chunks(total: int, size: int = MB) -> Iterator[bytes]:
    block = b"[" * size
    for _ in range(total // size):
        yield block


def open_request(gw: GatewayProcess, path: str, headers: dict[str, str], first: bytes) -> socket.socket:
    """Send a request head and the first chunk of a chunked body, and leave the body unfinished."""
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    sock.sendall(head.encode())
    send_chunk(sock, first)
    return sock


def send_chunk(sock: socket.socket, data: bytes) -> None:
    sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")


def read_response(sock: socket.socket) -> tuple[int, dict]:
    """The status and JSON body of the response (waits up to the socket's timeout)."""
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    return resp.status, json.loads(resp.read() or b"{}")


def assert_openai_error(body: dict, code: str | None = None) -> None:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"])
    if code is not None:
        assert body["error"]["code"] == code, body


def multipart_head(boundary: str, filename: str = "input.jsonl") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode()


def files_on_disk(gw: GatewayProcess) -> list[str]:
    root = gw.state_dir / "files"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def metrics(gw: GatewayProcess) -> str:
    r = httpx.get(gw.base_url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10)
    assert r.status_code == 200
    return r.text


def chat_line(custom_id: str, content: str) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": CHAT,
            "body": {"model": SERVED_MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}}


def jsonl(items: list) -> bytes:
    return ("\n".join(i if isinstance(i, str) else json.dumps(i) for i in items) + "\n").encode()


def wait_batch(client: openai.OpenAI, batch_id: str, timeout: float = 180.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        b = client.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} still {b.status} after {timeout:.0f} s")


def read_lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines() if x.strip()]


# ------------------------------------------------------- attack 1: unauthenticated exhaustion


@pytest.mark.parametrize("path", [CHAT, "/v1/completions", "/v1/files", "/v1/batches", "/v1/no-such-route"])
def test_no_key_is_refused_before_the_body_is_read(sgw, path):
    """The 401 arrives while the body is still coming: nothing of it was buffered or spooled."""
    boundary = "b" + secrets.token_hex(8)
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}" if path == "/v1/files"
               else "application/json"}
    sock = open_request(sgw, path, headers, multipart_head(boundary) if path == "/v1/files" else b"[" * 1000)
    with sock:
        status, body = read_response(sock)
    assert status == 401
    assert_openai_error(body, "invalid_api_key")


def test_huge_chunked_body_without_key_does_not_grow_memory(sgw):
    before = peak_rss(sgw.proc.pid)
    r = httpx.post(sgw.base_url + CHAT, content=chunks(HUGE), headers={"Content-Type": "application/json"},
                   timeout=120)
    assert r.status_code == 401
    assert_openai_error(r.json(), "invalid_api_key")
    growth = peak_rss(sgw.proc.pid) - before
    assert growth < MAX_GROWTH, f"the gateway's peak memory grew by {growth / MB:.0f} MB"


def test_huge_chunked_body_with_key_is_413_as_it_arrives(sgw):
    before = peak_rss(sgw.proc.pid)
    r = httpx.post(sgw.base_url + CHAT, content=chunks(HUGE), timeout=120,
                   headers={"Content-Type": "application/json", "Authorization": f"Bearer {sgw.api_key}"})
    assert r.status_code == 413
    assert_openai_error(r.json(), "request_too_large")
    growth = peak_rss(sgw.proc.pid) - before
    assert growth < MAX_GROWTH, f"the gateway's peak memory grew by {growth / MB:.0f} MB"


def test_lying_content_length_is_413(sgw):
    """A Content-Length over the limit is refused at once; no body needs to follow."""
    sock = socket.create_connection(("127.0.0.1", sgw.port), timeout=60)
    with sock:
        sock.sendall((f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {sgw.api_key}\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {HUGE}\r\n\r\n{{").encode())
        status, body = read_response(sock)
    assert status == 413
    assert_openai_error(body, "request_too_large")


async def test_uploads_stream_to_their_place_and_oversized_ones_leave_nothing(sgw):
    client = sgw.client()
    # The SDK's way: a file over the cap is 413 in OpenAI's format.
    with pytest.raises(openai.APIStatusError) as info:
        client.files.create(file=("big.jsonl", b"x" * (2 * MAX_FILE_BYTES)), purpose="batch")
    assert info.value.status_code == 413
    assert_openai_error(info.value.response.json(), "file_too_large")
    assert files_on_disk(sgw) == []

    # An upload is written to the files directory as it arrives (no spooling elsewhere first) ...
    boundary = "b" + secrets.token_hex(8)
    headers = {"Authorization": f"Bearer {sgw.api_key}", "Content-Type": f"multipart/form-data; boundary={boundary}"}
    sock = open_request(sgw, "/v1/files", headers, multipart_head(boundary) + b"y" * 1000)
    with sock:
        await wait_until(lambda: any(n.endswith(".part") for n in files_on_disk(sgw)), timeout=30,
                   what="the upload's partial file in the files directory")
        # ... and the cap applies to the bytes as they come: 413 before the client has finished.
        for _ in range(3):
            send_chunk(sock, b"y" * MAX_FILE_BYTES)
        status, body = read_response(sock)
    assert status == 413
    assert_openai_error(body, "file_too_large")
    await wait_until(lambda: files_on_disk(sgw) == [], timeout=30, what="the refused upload's partial file to go")
    assert client.files.list().data == []


# ---------------------------------------------------------- attack 3: a poisoned batch line


def test_deeply_nested_line_fails_alone_and_never_blocks_other_batches(sgw, other_client):
    client = sgw.client()
    poison = client.files.create(file=("poison.jsonl", jsonl(["[" * 50_000, chat_line("fine", "Hello")])),
                                 purpose="batch")
    poisoned = client.batches.create(input_file_id=poison.id, endpoint=CHAT, completion_window="24h")
    good_file = other_client.files.create(file=("good.jsonl", jsonl([chat_line(f"q{i}", "Hi") for i in range(3)])),
                                          purpose="batch")
    good = other_client.batches.create(input_file_id=good_file.id, endpoint=CHAT, completion_window="24h")

    done = wait_batch(other_client, good.id)
    assert done.status == "completed" and done.request_counts.completed == 3

    bad = wait_batch(client, poisoned.id)
    assert bad.status == "completed", bad
    assert (bad.request_counts.total, bad.request_counts.completed, bad.request_counts.failed) == (2, 1, 1)
    [err] = read_lines(client, bad.error_file_id)
    assert err["error"]["code"] == "invalid_json" and err["error"]["line"] == 1
    assert "nested" in err["error"]["message"]


# --------------------------------------------------------------- attack 4: private state


def test_state_is_private_and_deleted_text_leaves_the_database(sgw):
    canary = "canary-" + secrets.token_hex(12)
    client = sgw.client()
    f = client.files.create(file=(f"{canary}.jsonl", jsonl([chat_line("c1", f"Please repeat {canary}")])),
                            purpose="batch")
    batch = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                                     completion_window="24h").id)
    assert batch.status == "completed" and batch.request_counts.completed == 1

    state = sgw.state_dir
    db = state / "gateway.db"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode)
             for p in (state, state / "files", db, Path(f"{db}-wal"), Path(f"{db}-shm"),
                       state / "files" / f.id, state / "files" / batch.output_file_id)}
    assert modes == {state.name: 0o700, "files": 0o700, "gateway.db": 0o600, "gateway.db-wal": 0o600,
                     "gateway.db-shm": 0o600, f.id: 0o600, batch.output_file_id: 0o600}, modes

    r = httpx.delete(f"{sgw.base_url}/v1/batches/{batch.id}", headers={"Authorization": f"Bearer {sgw.api_key}"})
    assert r.status_code == 200
    assert client.files.delete(f.id).deleted

    def on_disk() -> bytes:
        return b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())

    assert canary.encode() not in on_disk()
    assert not (state / "files" / f.id).exists()


# ------------------------------------------------------------------ attack 6: metrics labels


def test_random_model_names_do_not_grow_metrics(sgw):
    client = sgw.client()
    baseline = metrics(sgw)
    names = ["m-" + secrets.token_hex(8) for _ in range(200)]
    for name in names:
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    after = metrics(sgw)
    assert not any(name in after for name in names)
    # The unknown models share one "other" series per metric (a handful of lines at most).
    assert len(after.splitlines()) - len(baseline.splitlines()) < 40


@pytest.mark.parametrize("length", [300, 100_000])
def test_overlong_model_name_is_a_clear_400(sgw, length):
    with pytest.raises(openai.APIStatusError) as info:
        sgw.client().chat.completions.create(model="m" * length, messages=[{"role": "user", "content": "x"}],
                                             max_tokens=1)
    assert info.value.status_code == 400
    assert_openai_error(info.value.response.json())
    assert info.value.response.json()["error"]["param"] == "model"


def test_metrics_need_the_token_when_one_is_set(sgw):
    assert httpx.get(sgw.base_url + "/metrics").status_code == 401
    wrong = httpx.get(sgw.base_url + "/metrics", headers={"Authorization": f"Bearer {sgw.api_key}"})
    assert wrong.status_code == 401
    assert_openai_error(wrong.json())
    assert "chatai_requests_total" in metrics(sgw)


# ------------------------------------------------------ attack 7: malformed batch result frames


async def test_malformed_result_frames_are_dropped_and_batches_go_on(sgw, broker):
    deployment = sqlite3.connect(f"file:{sgw.state_dir / 'gateway.db'}?mode=ro", uri=True).execute(
        "SELECT value FROM batch_meta WHERE key = 'deployment'").fetchone()[0]
    queue = topology.gateway_batch_results_queue(user_of(broker.url("gateway")), deployment)
    real_batch_id = "batch_" + secrets.token_hex(12)
    final = dict(body='{"choices": []}', usage=Usage())
    bodies = [
        Final(request_id="batch_x.\u00b2", **final).encode(),  # a superscript digit: isdigit() but not int()
        Final(request_id=f"{real_batch_id}.{'9' * 30}", **final).encode(),  # too big for SQLite
        Final(request_id=f"batch_{'z' * 5000}.1", **final).encode(),
        b"\xff not even json",
    ]
    conn = await aio_pika.connect(broker.url("worker"))  # the worker's rights: it may publish replies
    async with conn:
        channel = await conn.channel(publisher_confirms=True)
        replies = await channel.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
        for body in bodies:
            await replies.publish(aio_pika.Message(body, content_type=CONTENT_TYPE,
                                                   delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                                  routing_key=queue)

    def malformed() -> float:
        for line in metrics(sgw).splitlines():
            if line.startswith('chatai_malformed_frames_total{source="batch_results"}'):
                return float(line.split()[-1])
        return 0.0

    client = sgw.client()
    f = client.files.create(file=("after.jsonl", jsonl([chat_line(f"a{i}", "Hi") for i in range(2)])),
                            purpose="batch")
    b = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id)
    assert b.status == "completed" and b.request_counts.completed == 2
    def results_queue_empty() -> bool:  # dropped, not requeued forever
        q = next((q for q in broker.admin.list_queues() if q["name"] == queue), None)
        return q is not None and q["messages"] == 0

    await wait_until(results_queue_empty, timeout=30, what="the malformed frames to leave the results queue",
                     every=1.0)
    await wait_until(lambda: malformed() >= len(bodies), timeout=30, what="the malformed frames to be counted")
    log = sgw.log_path.read_text(errors="replace")
    assert "malformed" in log and "\u00b2" not in log and "z" * 100 not in log
