"""Issue 22, items 2-4: one key bloating the gateway, outputs escaping the quotas, and smaller holes.

Each test is an attack that worked against the gateway before its fix (each failed on that code),
run against real processes: a ``chatai gateway`` of this module's own (default budgets, a short
header timeout, a metrics token, two batch lines in flight), the session's RabbitMQ and its real
vLLM worker (``max_model_len`` 512, announced in its heartbeats). The tests print what they
measured; docs/security.md records the figures.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from conftest import SERVED_MODEL
from gateway.keys import KeyStore
from support.gateway import GatewayProcess, gateway_serving
from support.gateway import new_key as make_key
from support.waiting import wait_until
from test_security_http import assert_openai_error, jsonl, peak_rss, read_lines, wait_batch

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MB = 1024 * 1024
CONTEXT = 512  # the session worker's max_model_len
METRICS_TOKEN = "metrics-quotas-0123456789abcdef"
HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def qgw(broker, served_worker, tmp_path_factory) -> Iterator[GatewayProcess]:
    with gateway_serving(tmp_path_factory.mktemp("quota-gateway") / "state", broker.url("gateway"), SERVED_MODEL,
                         env={"CHATAI_GATEWAY_METRICS_TOKEN": METRICS_TOKEN,
                              "CHATAI_GATEWAY_HEADER_TIMEOUT": str(HEADER_TIMEOUT),
                              "CHATAI_GATEWAY_BATCH_TICK": "0.2",
                              "CHATAI_GATEWAY_BATCH_MAX_IN_FLIGHT": "2",
                              "CHATAI_GATEWAY_QUEUE_TIMEOUT": "60"}) as gw:
        yield gw


def new_key(gw: GatewayProcess, **limits: int) -> tuple[str, str]:
    return make_key(gw, "quota-test", **limits)


def set_limits(gw: GatewayProcess, key_id: str, **limits: int | None) -> None:
    store = KeyStore(gw.state_dir / "gateway.db")
    try:
        assert store.set_limits(key_id, limits)
    finally:
        store.close()


def sdk(gw: GatewayProcess, key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url + "/v1", api_key=key or gw.api_key, max_retries=0, timeout=120)


def post(gw: GatewayProcess, path: str, content: bytes, key: str | None = None) -> httpx.Response:
    return httpx.post(gw.base_url + path, content=content, timeout=120,
                      headers={"Authorization": f"Bearer {key or gw.api_key}", "Content-Type": "application/json"})


def refused(exc_info, param: str | None = None) -> dict:
    """The gateway's own 400 (an OpenAI error whose code is a word; vLLM's carries the number 400)."""
    assert exc_info.value.status_code == 400
    body = exc_info.value.response.json()
    assert_openai_error(body)
    assert isinstance(body["error"]["code"], str), body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


# ------------------------------------------------------ item 2: prompts longer than any context


def test_token_prompts_and_message_lists_longer_than_the_context_are_refused_by_the_gateway(qgw):
    client = sdk(qgw)
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_MODEL, prompt=[1] * (CONTEXT + 1), max_tokens=1)
    assert refused(info, "prompt")["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_MODEL, prompt=[[1, 2], [1] * (CONTEXT + 1)], max_tokens=1)
    assert refused(info, "prompt")["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_MODEL, max_tokens=1,
                                       messages=[{"role": "user", "content": "x"}] * (CONTEXT + 1))
    assert refused(info, "messages")["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=SERVED_MODEL, input=[1] * (CONTEXT + 1))
    assert refused(info, "input")["code"] == "context_length_exceeded"
    # Within the context, the worker answers as before.
    ok = client.completions.create(model=SERVED_MODEL, prompt=[1] * 8, max_tokens=1)
    assert ok.choices and ok.usage.prompt_tokens == 8


def test_six_concurrent_worst_case_bodies_keep_the_gateway_small(qgw):
    """The issue's attack: 4.18 MB token-id prompts and 100,000-message chats, six at once."""
    prompt = b'{"model": "%s", "max_tokens": 1, "prompt": [' % SERVED_MODEL.encode() + b"1," * 2_089_999 + b"1]}"
    messages = json.dumps({"model": SERVED_MODEL, "max_tokens": 1,
                           "messages": [{"role": "user", "content": "hi"}] * 100_000},
                          separators=(",", ":")).encode()
    assert len(prompt) < 4 * MB and len(messages) < 4 * MB

    async def six(path: str, body: bytes) -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {qgw.api_key}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=qgw.base_url, timeout=120, headers=headers) as http:
            return await asyncio.gather(*(http.post(path, content=body) for _ in range(6)))

    for path, body in ((COMPLETIONS, prompt), (CHAT, messages)):
        before = peak_rss(qgw.proc.pid)
        started = time.monotonic()
        answers = asyncio.run(six(path, body))
        took = time.monotonic() - started
        growth = peak_rss(qgw.proc.pid) - before
        print(f"{path}: 6 x {len(body) / 1e6:.2f} MB refused in {took:.2f} s, peak RSS +{growth / MB:.1f} MB")
        for r in answers:
            assert r.status_code == 400, r.text[:300]
            assert_openai_error(r.json())
            assert isinstance(r.json()["error"]["code"], str), r.text[:300]  # the gateway's, not vLLM's
        assert growth < 100 * MB, f"the gateway's peak memory grew by {growth / MB:.0f} MB"


# ------------------------------------------------------------------ item 3: output budgets


def test_n_times_max_tokens_is_capped(qgw):
    client = sdk(qgw)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], n=16,
                                       max_tokens=4000)
    assert refused(info, "max_tokens")["code"] == "output_budget_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], n=8,
                                       max_completion_tokens=8000)
    assert refused(info, "max_completion_tokens")["code"] == "output_budget_exceeded"
    with pytest.raises(openai.BadRequestError) as info:  # 8 prompts x n=8 x 1000 tokens
        client.completions.create(model=SERVED_MODEL, prompt=["a"] * 8, n=8, max_tokens=1000)
    assert refused(info, "max_tokens")["code"] == "output_budget_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.responses.create(model=SERVED_MODEL, input="hi", max_output_tokens=1_000_000)
    assert refused(info, "max_output_tokens")["code"] == "output_budget_exceeded"


def test_logprobs_per_request_are_capped(qgw):
    """The issue's 153-byte request that produced 48.3 MB: n=16, max_tokens=2000, top_logprobs=20."""
    client = sdk(qgw)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}], n=16,
                                       max_tokens=2000, logprobs=True, top_logprobs=20,
                                       extra_body={"ignore_eos": True})
    assert refused(info)["code"] == "logprobs_budget_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_MODEL, prompt="hi", n=16, max_tokens=2000, logprobs=20)
    assert refused(info)["code"] == "logprobs_budget_exceeded"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=SERVED_MODEL, prompt="hi", max_tokens=2, extra_body={"prompt_logprobs": 1000})
    assert refused(info, "prompt_logprobs")["code"] == "logprobs_budget_exceeded"
    small = client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4, logprobs=True, top_logprobs=5)
    assert len(small.choices[0].logprobs.content[0].top_logprobs) == 5


def test_choices_count_as_requests_per_minute(qgw):
    key_id, key = new_key(qgw, rpm=10)
    client = sdk(qgw, key)
    client.completions.create(model=SERVED_MODEL, prompt=["a", "b", "c", "d"], n=2, max_tokens=1)  # 8 choices
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model=SERVED_MODEL, prompt=["a", "b"], n=2, max_tokens=1)  # 8 + 4 > 10
    assert info.value.response.headers["x-ratelimit-remaining-requests"] == "2"
    client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)


def test_tokens_per_minute_have_a_default(qgw):
    r = httpx.post(qgw.base_url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {qgw.api_key}"},
                   json={"model": SERVED_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 200
    assert int(r.headers["x-ratelimit-limit-tokens"]) > 0


def _batch_lines(count: int, max_tokens: int, **extra) -> bytes:
    return jsonl([{"custom_id": f"l{i}", "method": "POST", "url": CHAT,
                   "body": {"model": SERVED_MODEL, "max_tokens": max_tokens, "ignore_eos": True,
                            "messages": [{"role": "user", "content": f"line {i}"}], **extra}} for i in range(count)])


def test_batch_lines_count_against_tokens_per_minute(qgw):
    """A key over its tpm gets no more batch lines sent, and batch tokens count against it."""
    key_id, key = new_key(qgw, tpm=1)
    client = sdk(qgw, key)
    f = client.files.create(file=("tpm.jsonl", _batch_lines(6, 8)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
    # Two lines are in flight at once; once they are charged, the key is over its tpm and the rest wait.
    wait_until(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2, timeout=60,
               what="the first lines' results")
    time.sleep(3)
    held = client.batches.retrieve(batch.id)
    # (a line may slip out between a result's commit and its charge: at most the window's two)
    assert held.status == "in_progress" and held.request_counts.completed <= 4, held.request_counts
    with pytest.raises(openai.RateLimitError):  # the batch's tokens count for interactive requests too
        client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=1)
    set_limits(qgw, key_id, tpm=0)
    done = wait_batch(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 6


def test_batch_outputs_count_against_the_storage_quota(qgw):
    """A 2,000-byte storage quota: outputs count, lines past it fail, and the key cannot upload more."""
    key_id, key = new_key(qgw, upload_bytes=2000)
    client = sdk(qgw, key)
    data = _batch_lines(8, 40, n=2, logprobs=True, top_logprobs=5)
    assert len(data) < 2000
    f = client.files.create(file=("big-output.jsonl", data), purpose="batch")
    done = wait_batch(client, client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h").id)
    out = client.files.retrieve(done.output_file_id)
    errors = read_lines(client, done.error_file_id)
    print(f"storage quota 2000 B: input {len(data)} B, output {out.bytes} B, "
          f"{done.request_counts.completed} lines done, {len(errors)} refused")
    assert done.request_counts.failed >= 1
    assert {e["error"]["code"] for e in errors} == {"storage_quota_exceeded"}
    # The overshoot is what was in flight when the quota was reached (two lines here).
    assert done.request_counts.completed <= 4
    with pytest.raises(openai.RateLimitError) as info:
        client.files.create(file=("more.jsonl", b"{}\n"), purpose="batch")
    assert info.value.response.json()["error"]["code"] == "upload_quota_exceeded"
    client.files.delete(done.output_file_id)
    client.files.delete(done.error_file_id)
    client.files.delete(f.id)
    assert client.files.create(file=("fits.jsonl", b"{}\n"), purpose="batch").bytes == 3


# ------------------------------------------------------------------------- item 4: smaller


def test_clients_that_never_finish_their_headers_are_dropped(qgw):
    """Slowloris: silent connections, half a request head, and a head that trickles in forever."""
    socks = []
    for i in range(60):
        s = socket.create_connection(("127.0.0.1", qgw.port), timeout=30)
        if i % 3 == 1:
            s.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\n".encode())
        elif i % 3 == 2:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    trickle = socket.create_connection(("127.0.0.1", qgw.port), timeout=30)
    trickle.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
    started = time.monotonic()
    closed_at = None
    for _ in range(40):  # one byte every 0.25 s: never idle, never finished
        try:
            trickle.sendall(b"a")
        except OSError:
            closed_at = time.monotonic() - started
            break
        time.sleep(0.25)
    assert closed_at is not None, "a header trickling in for 10 s was never cut off"
    # The others are closed too: the server's FIN (recv returns b"") or a reset.
    for s in socks:
        s.settimeout(max(0.1, HEADER_TIMEOUT * 3 - (time.monotonic() - started)))
        try:
            while s.recv(4096):
                pass
        except (TimeoutError, socket.timeout):
            raise AssertionError("a connection that never finished its request head is still open") from None
        except ConnectionResetError:
            pass
        s.close()
    trickle.close()
    print(f"trickling header cut off after {closed_at:.1f} s (header timeout {HEADER_TIMEOUT} s)")
    assert httpx.get(qgw.base_url + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("filename", ["\u2603.jsonl", "a\x00b.jsonl", 'q"uote\\ \u00e9\t.jsonl'])
def test_files_with_any_name_download(qgw, filename):
    """The name as the multipart head carries it, raw (httpx would percent-encode a NUL)."""
    data = b'{"custom_id": "x"}\n'
    boundary = "b0123456789"
    quoted = filename.replace("\\", "\\\\").replace('"', '\\"')
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{quoted}\"\r\n"
            f"Content-Type: application/jsonl\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    r = httpx.post(qgw.base_url + "/v1/files", content=body, timeout=30,
                   headers={"Authorization": f"Bearer {qgw.api_key}",
                            "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    file_id = r.json()["id"]
    got = httpx.get(f"{qgw.base_url}/v1/files/{file_id}/content", timeout=30,
                    headers={"Authorization": f"Bearer {qgw.api_key}"})
    assert got.status_code == 200 and got.content == data
    disposition = got.headers["content-disposition"]
    assert disposition.isascii() and "filename*=UTF-8''" in disposition
    assert sdk(qgw).files.content(file_id).content == data


def test_worker_details_in_status_are_for_operators_only(qgw):
    as_key = httpx.get(qgw.base_url + "/api/status", headers={"Authorization": f"Bearer {qgw.api_key}"}, timeout=10)
    as_operator = httpx.get(qgw.base_url + "/api/status", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                            timeout=10)
    assert as_key.status_code == 200 and as_operator.status_code == 200
    [worker] = [w for w in as_operator.json()["workers"] if w["model"] == SERVED_MODEL]
    assert worker["worker_id"] and worker["node"]
    [seen] = [w for w in as_key.json()["workers"] if w["model"] == SERVED_MODEL]
    for secret in (worker["worker_id"], worker["node"]):
        assert secret not in as_key.text
    assert {"worker_id", "node", "slurm_job_id"}.isdisjoint(seen) and seen["state"] == "ready"
    assert as_key.json()["models"] == as_operator.json()["models"]
