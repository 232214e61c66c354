"""Per-API-key limits through the official OpenAI SDK: a real gateway process, RabbitMQ and vLLM worker.

Each test makes its own key with its own limits (the session gateway's other keys keep the
defaults), so it never disturbs other suites. Limits are per minute and the tests send their
requests well within one, so nothing here depends on the machine's speed. To hold requests in
flight deterministically, the concurrency and open-batch tests pause the real worker (SIGSTOP:
requests wait on the broker as they would behind a busy cluster) and resume it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys

import httpx
import openai
import pytest

from conftest import SERVED_MODEL
from support.gateway import new_key as make_key
from support.waiting import wait_until

CHAT = [{"role": "user", "content": "Tell me about rate limits."}]
RESET = re.compile(r"^(\d+ms|\d+(\.\d+)?s|\d+m\d+s)$")  # OpenAI's x-ratelimit-reset-* format


def new_key(gateway, **limits: int) -> tuple[str, str]:
    return make_key(gateway, "limits-test", **limits)


def sdk(gateway, key: str, asynchronous: bool = False):
    cls = openai.AsyncOpenAI if asynchronous else openai.OpenAI
    return cls(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0)


def ask(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=2, **kw)


def assert_retry_after(headers: httpx.Headers, at_most: float) -> float:
    seconds = int(headers["retry-after"])
    ms = int(headers["retry-after-ms"])
    assert 1 <= seconds <= at_most and 0 < ms <= seconds * 1000
    return seconds


@contextlib.contextmanager
def worker_paused(worker):
    """Stop the real worker process (not its engine core) and always let it go on afterwards."""
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(worker.pid, signal.SIGCONT)


def in_flight(gateway) -> float:
    text = httpx.get(gateway.base_url + "/metrics", timeout=5).text
    match = re.search(rf'^chatai_in_flight_requests\{{model="{SERVED_MODEL}"\}} (\S+)$', text, re.M)
    return float(match.group(1)) if match else 0.0


# ------------------------------------------------------------------------ requests per minute


def test_requests_per_minute_gives_429_with_openai_headers_and_spares_other_keys(gateway):
    key_id, key = new_key(gateway, rpm=3, tpm=0)  # tpm 0: unlimited, no -tokens headers
    client = sdk(gateway, key)
    for i in range(3):
        raw = client.chat.completions.with_raw_response.create(model=SERVED_MODEL, messages=CHAT, max_tokens=2)
        assert raw.parse().choices[0].message.content is not None
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert RESET.match(raw.headers["x-ratelimit-reset-requests"])

    # The fourth within the minute, streamed this time: refused before anything is queued.
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, stream=True)
    err = caught.value
    assert err.status_code == 429 and err.code == "rate_limit_exceeded"
    assert err.body["type"] == "rate_limit_error" and "requests per minute" in err.message
    headers = err.response.headers
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert RESET.match(headers["x-ratelimit-reset-requests"])
    # The oldest of the three leaves the window at most a minute after it was sent.
    assert_retry_after(headers, at_most=61)
    assert "x-ratelimit-limit-tokens" not in headers  # no token limit on this key
    with pytest.raises(openai.RateLimitError):
        ask(client)  # still refused: refusals are not "spent", the window is what counts

    # Another key is unaffected.
    assert ask(gateway.client()).choices[0].message.content is not None

    # The operator lifts the limit of the existing key; the running gateway applies it at once.
    env = {**os.environ, "CHATAI_GATEWAY_STATE_DIR": str(gateway.state_dir)}
    out = subprocess.run([sys.executable, "-m", "chatai.cli", "keys", "set-limits", key_id, "--rpm", "0"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert "rpm=0" in out
    raw = client.chat.completions.with_raw_response.create(model=SERVED_MODEL, messages=CHAT, max_tokens=2)
    assert raw.parse().choices and "x-ratelimit-limit-requests" not in raw.headers


# -------------------------------------------------------------------------- tokens per minute


def test_tokens_per_minute_are_charged_from_usage_and_then_refused(gateway):
    _, key = new_key(gateway, tpm=24)
    client = sdk(gateway, key)
    raw = client.chat.completions.with_raw_response.create(model=SERVED_MODEL, messages=CHAT, max_tokens=16,
                                                           extra_body={"ignore_eos": True})
    usage = raw.parse().usage
    assert usage.completion_tokens == 16 and usage.total_tokens >= 24  # the prompt adds more
    assert raw.headers["x-ratelimit-limit-tokens"] == "24"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "24"  # as of admission: nothing used before

    with pytest.raises(openai.RateLimitError) as caught:
        ask(client, stream=True)
    err = caught.value
    assert err.code == "rate_limit_exceeded" and "tokens per minute" in err.message
    headers = err.response.headers
    assert headers["x-ratelimit-limit-tokens"] == "24" and headers["x-ratelimit-remaining-tokens"] == "0"
    assert RESET.match(headers["x-ratelimit-reset-tokens"])
    assert_retry_after(headers, at_most=61)
    assert ask(gateway.client()).choices  # another key is unaffected


# ------------------------------------------------------------------------- concurrent streams


async def test_one_stream_over_max_concurrent_is_refused_while_the_others_complete(gateway, served_worker):
    _, key = new_key(gateway, max_concurrent=2)
    client = sdk(gateway, key, asynchronous=True)
    other = gateway.async_client()

    def stream():
        # ignore_eos: the tiny random model may end an answer at its first token.
        return client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=6, stream=True,
                                              extra_body={"ignore_eos": True})

    with worker_paused(served_worker):
        # Two streams are admitted and wait for the paused worker to start them.
        held = [asyncio.create_task(stream()) for _ in range(2)]
        await wait_until(lambda: in_flight(gateway) >= 2, timeout=30, what="two admitted streams in flight")
        with pytest.raises(openai.RateLimitError) as caught:
            await stream()
        err = caught.value
        assert err.status_code == 429 and err.code == "concurrency_limit_exceeded"
        assert "concurrent" in err.message
        assert_retry_after(err.response.headers, at_most=1)
        # Another key's stream is admitted (it waits for the worker like the others).
        others = asyncio.create_task(other.chat.completions.create(model=SERVED_MODEL, messages=CHAT,
                                                                   max_tokens=6, stream=True,
                                                                   extra_body={"ignore_eos": True}))
        await wait_until(lambda: in_flight(gateway) >= 3, timeout=30, what="the other key's stream in flight")
        assert not any(t.done() for t in held)

    async def text(task) -> str:
        return "".join([c.choices[0].delta.content or "" async for c in await task if c.choices])

    texts = await asyncio.wait_for(asyncio.gather(*(text(t) for t in [*held, others])), timeout=120)
    assert all(texts), "a stream admitted under the limit did not complete"

    # Finished streams give their slots back: the key streams again.
    async def admitted() -> bool:
        try:
            return bool(await text(asyncio.ensure_future(stream())))
        except openai.RateLimitError:
            return False

    await wait_until(admitted, timeout=30, what="the key's slots to be free again")


# ------------------------------------------------------------------- uploads and open batches


def _lines(n: int) -> bytes:
    body = {"model": SERVED_MODEL, "messages": CHAT, "max_tokens": 2}
    rows = [json.dumps({"custom_id": f"l-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
            for i in range(n)]
    return ("\n".join(rows) + "\n").encode()


def test_upload_bytes_per_key_are_capped_and_freed_by_deleting(gateway):
    _, key = new_key(gateway, upload_bytes=1000)
    client = sdk(gateway, key)
    files_dir = gateway.state_dir / "files"
    first = client.files.create(file=("a.jsonl", b"x" * 600), purpose="batch")
    before = set(os.listdir(files_dir))

    # 600 more would make 1200: refused, and nothing of it kept.
    with pytest.raises(openai.RateLimitError) as caught:
        client.files.create(file=("b.jsonl", b"y" * 600), purpose="batch")
    err = caught.value
    assert err.status_code == 429 and err.code == "upload_quota_exceeded" and err.param == "file"
    assert "1000 bytes" in err.message and "600 bytes in use" in err.message
    assert err.response.headers["x-should-retry"] == "false"  # the SDK does not retry it
    assert set(os.listdir(files_dir)) == before
    assert [f.id for f in client.files.list()] == [first.id]

    assert client.files.create(file=("c.jsonl", b"z" * 400), purpose="batch").bytes == 400  # exactly the cap
    with pytest.raises(openai.RateLimitError):
        client.files.create(file=("d.jsonl", b"!"), purpose="batch")  # full: refused before reading
    # Another key is unaffected.
    assert gateway.client().files.create(file=("e.jsonl", b"w" * 600), purpose="batch").bytes == 600
    # Deleting frees the room.
    client.files.delete(first.id)
    assert client.files.create(file=("f.jsonl", b"v" * 600), purpose="batch").bytes == 600


async def test_open_batches_per_key_are_capped_until_one_ends(gateway, served_worker):
    _, key = new_key(gateway, open_batches=1)
    client = sdk(gateway, key)
    other = gateway.client()
    src = client.files.create(file=("in.jsonl", _lines(2)), purpose="batch")
    other_src = other.files.create(file=("in.jsonl", _lines(2)), purpose="batch")

    def create(c: openai.OpenAI, file_id: str):
        return c.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")

    with worker_paused(served_worker):  # the first batch cannot finish meanwhile
        first = create(client, src.id)
        with pytest.raises(openai.RateLimitError) as caught:
            create(client, src.id)
        err = caught.value
        assert err.status_code == 429 and err.code == "open_batches_limit_exceeded"
        assert err.response.headers["x-should-retry"] == "false"
        assert [b.id for b in client.batches.list()] == [first.id]  # nothing half-created
        other_batch = create(other, other_src.id)  # another key is unaffected

    def ended(c: openai.OpenAI, batch_id: str) -> bool:
        return c.batches.retrieve(batch_id).status in ("completed", "failed", "expired", "cancelled")

    await wait_until(lambda: ended(client, first.id), timeout=120, what="the first batch to end")
    await wait_until(lambda: ended(other, other_batch.id), timeout=120, what="the other key's batch to end")
    assert client.batches.retrieve(first.id).status == "completed"
    second = create(client, src.id)  # the slot is free again
    await wait_until(lambda: ended(client, second.id), timeout=120, what="the second batch to end")
