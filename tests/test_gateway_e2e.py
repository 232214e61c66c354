"""End to end through the official OpenAI SDK: gateway -> RabbitMQ -> real vLLM worker (CPU).

The worker is the session's ``served_worker`` on the tiny model; nothing here is mocked.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import SERVED_MODEL, UNSERVED_MODEL
from support.gateway import start_gateway

CHAT = [{"role": "user", "content": "Tell me about the cluster."}]


def _stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def test_streaming_chat_with_usage(gateway):
    client = gateway.client()
    stream = client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, stream=True, max_tokens=12,
                                            stream_options={"include_usage": True})
    text, chunks = _stream_text(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert text, "no content streamed"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-")


def test_non_streaming_chat_max_tokens_and_length(gateway):
    resp = gateway.client().chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=7,
                                                    extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert resp.object == "chat.completion" and resp.model == SERVED_MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert resp.usage.completion_tokens == 7
    assert resp.usage.prompt_tokens > 0


def test_max_completion_tokens_is_honoured(gateway):
    resp = gateway.client().chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_completion_tokens=3,
                                                    extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 3


def test_stop_sequence_cuts_the_text(gateway):
    client = gateway.client()
    kw = dict(model=SERVED_MODEL, messages=CHAT, temperature=0, max_tokens=40, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert len(full) > 12, full
    stop = full[8:11]
    cut = client.chat.completions.create(stop=[stop], **kw).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_n_choices_streamed_and_whole(gateway):
    client = gateway.client()
    resp = client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, n=3, max_tokens=5, temperature=1.0,
                                          extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == [0, 1, 2]
    assert resp.usage.completion_tokens == 15
    stream = client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, n=2, max_tokens=5, stream=True,
                                            extra_body={"ignore_eos": True})
    texts: dict[int, str] = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_seed_makes_sampling_reproducible(gateway):
    client = gateway.client()
    kw = dict(model=SERVED_MODEL, messages=CHAT, temperature=1.0, max_tokens=16, extra_body={"ignore_eos": True})
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_logprobs(gateway):
    resp = gateway.client().chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=4, logprobs=True,
                                                    top_logprobs=2, extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_text_completions_stream_and_whole(gateway):
    client = gateway.client()
    resp = client.completions.create(model=SERVED_MODEL, prompt="The cluster", max_tokens=6,
                                     extra_body={"ignore_eos": True})
    assert resp.object == "text_completion" and resp.choices[0].text
    assert resp.usage.completion_tokens == 6 and resp.choices[0].finish_reason == "length"
    echoed = client.completions.create(model=SERVED_MODEL, prompt="The cluster", max_tokens=3, echo=True)
    assert echoed.choices[0].text.startswith("The cluster")
    stream = client.completions.create(model=SERVED_MODEL, prompt="The cluster", max_tokens=6, stream=True,
                                       extra_body={"ignore_eos": True})
    text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text


def test_32_concurrent_streams(gateway):
    client = gateway.async_client(timeout=120)

    async def one(i: int) -> tuple[str, float]:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model=SERVED_MODEL, stream=True, max_tokens=16, extra_body={"ignore_eos": True},
            messages=[{"role": "user", "content": f"Question number {i}"}])
        first = None
        text = ""
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.monotonic() - started
                text += chunk.choices[0].delta.content
        return text, first or float("inf")

    async def all_of_them():
        return await asyncio.gather(*(one(i) for i in range(32)))

    t0 = time.monotonic()
    results = asyncio.run(all_of_them())
    elapsed = time.monotonic() - t0
    assert len(results) == 32 and all(text for text, _ in results)
    ttfts = sorted(t for _, t in results)
    print(f"\n32 streams x 16 tokens: {elapsed:.1f} s, TTFT p50 {ttfts[16]:.2f} s, max {ttfts[-1]:.2f} s")


def test_unknown_model_is_404(gateway):
    with pytest.raises(openai.NotFoundError) as err:
        gateway.client().chat.completions.create(model="no-such-model", messages=CHAT)
    assert err.value.status_code == 404
    assert err.value.body["code"] == "model_not_found"
    assert SERVED_MODEL in err.value.message  # it names the models that exist
    with pytest.raises(openai.NotFoundError) as err:
        gateway.client().models.retrieve("no-such-model")
    assert SERVED_MODEL in err.value.message


def test_bad_key_is_401(gateway):
    bad = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key="sk-chatai-wrong-key-000000", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model=SERVED_MODEL, messages=CHAT)
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    r = httpx.get(gateway.base_url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_bodies_are_400(gateway):
    """The gateway's own checks (model, stream, n) and vLLM's (everything else), both a 400."""
    client = gateway.client()
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", messages=CHAT)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, n=99)
    assert err.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as err:  # vLLM's refusal, relayed
        client.chat.completions.create(model=SERVED_MODEL, messages=CHAT, temperature=-1)
    assert "temperature" in err.value.message
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=SERVED_MODEL, messages=[], stream=True)
    r = httpx.post(gateway.base_url + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                   headers={"Authorization": f"Bearer {gateway.api_key}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_too_long_prompt_is_400(gateway):
    with pytest.raises(openai.BadRequestError) as err:
        gateway.client().completions.create(model=SERVED_MODEL, prompt="word " * 5000, max_tokens=4)
    assert "maximum context length is 512" in err.value.message  # vLLM's own words and status


def test_models_come_from_live_workers(gateway):
    client = gateway.client()
    assert SERVED_MODEL in [m.id for m in client.models.list().data]
    assert UNSERVED_MODEL not in [m.id for m in client.models.list().data]
    assert client.models.retrieve(SERVED_MODEL).id == SERVED_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_model_that_nothing_will_start_is_503_model_not_loaded_at_once(gateway):
    """A model with a queue but no worker, no autoscaler and no worker starting: waiting the queue
    timeout would help nobody. Streamed or not, the status says so (the SDK does not retry it)."""
    for stream in (True, False):
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as err:
            gateway.client().chat.completions.create(model=UNSERVED_MODEL, messages=CHAT, stream=stream)
        if not stream:  # by now the gateway has listened long enough to trust silence: no wait at all
            assert time.monotonic() - t0 < 10
        assert err.value.status_code == 503 and err.value.body["code"] == "model_not_loaded"
        assert "no autoscaler is running" in err.value.body["message"]
        assert err.value.response.headers["retry-after"] == "60"
        assert err.value.response.headers["x-should-retry"] == "false"


def _in_flight(health: dict) -> int:
    return health["models"].get(SERVED_MODEL, {}).get("in_flight", -1)


def _completion_tokens(worker, request_id: str | None = None) -> int:
    """What the worker's log says it generated for a request (the last one if no id is given)."""
    lines = [ln for ln in worker.log_text().splitlines() if "completion_tokens=" in ln
             and (request_id is None or f"request_id={request_id}" in ln)]
    assert lines, f"no log line for request {request_id}"
    return int(re.search(r"completion_tokens=(\d+)", lines[-1]).group(1))


LONG = {"max_tokens": 480, "n": 16, "ignore_eos": True}  # 7,680 tokens: seconds of CPU work


def test_stream_disconnect_aborts_generation(gateway, served_worker):
    gateway.wait_for(lambda h: _in_flight(h) == 0, what="an idle worker")
    client = gateway.client(timeout=60)
    with client.chat.completions.with_streaming_response.create(
            model=SERVED_MODEL, messages=CHAT, stream=True, max_tokens=LONG["max_tokens"], n=LONG["n"],
            extra_body={"ignore_eos": True}) as response:
        request_id = None
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                request_id = json.loads(line[5:])["id"].removeprefix("chatcmpl-")
                seen += 1
            if seen >= 3:
                break
    # Leaving the block closed the connection mid-stream.
    gateway.wait_for(lambda h: _in_flight(h) == 0, timeout=10, what="the abort to reach the worker")
    generated = _completion_tokens(served_worker, request_id)
    assert generated < LONG["max_tokens"] * LONG["n"], "the worker finished instead of aborting"


def test_non_streaming_disconnect_aborts_generation(gateway, served_worker):
    gateway.wait_for(lambda h: _in_flight(h) == 0, what="an idle worker")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(gateway.base_url + "/v1/completions", timeout=httpx.Timeout(0.3, connect=5.0),
                   headers={"Authorization": f"Bearer {gateway.api_key}"},
                   json={"model": SERVED_MODEL, "prompt": "x", **LONG})
    gateway.wait_for(lambda h: _in_flight(h) == 0, timeout=10, what="the abort to reach the worker")
    assert _completion_tokens(served_worker) < LONG["max_tokens"] * LONG["n"], "the worker finished instead of aborting"


def test_metrics_count_requests_and_tokens(gateway):
    gateway.client().chat.completions.create(model=SERVED_MODEL, messages=CHAT, max_tokens=2)
    text = httpx.get(gateway.base_url + "/metrics").text
    assert f'chatai_requests_total{{endpoint="chat",model="{SERVED_MODEL}",status="200"}}' in text
    assert f'chatai_tokens_total{{kind="completion",model="{SERVED_MODEL}"}}' in text
    assert "chatai_queue_wait_seconds_count" in text
    assert f'chatai_live_workers{{model="{SERVED_MODEL}",state="ready"}} 1.0' in text


def test_health_reports_broker_and_workers(gateway):
    health = gateway.health()
    assert health["status"] == "ok" and health["broker"]["connected"] is True
    assert health["models"][SERVED_MODEL]["ready"] >= 1
    assert json.dumps(health).count("amqp://") == 0  # no broker URL, let alone its password


def test_keys_cli_create_list_revoke(gateway):
    def cli(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "chatai.cli", "keys", *args, "--state-dir",
                               str(gateway.state_dir)], capture_output=True, text=True, check=True).stdout

    key_id, key = cli("create", "--name", "alice").split()
    assert key.startswith("sk-chatai-")
    client = openai.OpenAI(base_url=gateway.base_url + "/v1", api_key=key, max_retries=0)
    assert SERVED_MODEL in [m.id for m in client.models.list().data]
    listing = cli("list")
    assert key_id in listing and "alice" in listing and key not in listing  # only a hint is shown
    db = (gateway.state_dir / "gateway.db").read_bytes()
    assert key.encode() not in db  # stored hashed
    cli("revoke", key_id)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
