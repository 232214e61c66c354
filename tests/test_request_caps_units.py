"""Issue 22, items 2-4, the parts that need no broker: request caps, the JSON value count, the
limiter's choices, the download header, /docs, and the request-head deadline (a real uvicorn
server on a free port). Each of these failed on the code before the fix."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient

from gateway.app import create_app
from gateway.batches.routes import content_disposition
from gateway.errors import APIError
from gateway.header_timeout import http_protocol
from gateway.limits import Limits, RateLimited, RateLimiter
from gateway.schemas import RequestCaps, check_body, json_values, parse_json
from gateway.settings import GatewaySettings

CAPS = RequestCaps({"m": 512}, min_json_values=4096)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


def refused(endpoint: str, body: dict, caps: RequestCaps = CAPS) -> APIError:
    with pytest.raises(APIError) as info:
        check_body(endpoint, body, caps=caps)
    assert info.value.status == 400
    return info.value


def test_json_values_are_counted_without_parsing_and_strings_do_not_count():
    assert json_values(b'{"a": [1, 2, 3], "b": 1}', 100) == 3
    text = json.dumps({"prompt": "a,b,[c]{d}" * 1000 + '\\",[', "n": 1}).encode()
    assert json_values(text, 10) == 1  # over the rough bound, so counted exactly
    assert json_values(b"[" * 50_000, 10) == 0  # nesting is the parser's to refuse (~200 levels)
    with pytest.raises(APIError) as info:
        parse_json(b"[" + b"1," * 2_089_999 + b"1]", CAPS.max_json_values)
    assert info.value.code == "too_many_values"


def test_the_json_count_stays_linear_on_hostile_strings():
    hostile = b'["' + b'\\"' * 1_000_000  # an unterminated string of escaped quotes
    started = time.perf_counter()
    json_values(hostile + b"," * 10, 5)
    assert time.perf_counter() - started < 5  # quadratic would be hours


def test_prompts_and_messages_longer_than_the_context_are_refused():
    assert refused(COMPLETIONS, {"model": "m", "prompt": [1] * 513}).code == "context_length_exceeded"
    assert refused(COMPLETIONS, {"model": "m", "prompt": [[1], [1] * 513]}).param == "prompt"
    assert refused(CHAT, {"model": "m", "messages": [{"role": "user", "content": "x"}] * 513}).param == "messages"
    assert refused("/v1/embeddings", {"model": "m", "input": [1] * 513}).param == "input"
    assert check_body(COMPLETIONS, {"model": "m", "prompt": [1] * 512}, caps=CAPS).choices == 1
    # A model nobody announced yet: the fallback context.
    assert refused(COMPLETIONS, {"model": "new", "prompt": [1] * 131_073}).code == "context_length_exceeded"


def test_output_and_logprob_budgets():
    assert refused(CHAT, {"model": "m", "messages": [], "n": 16, "max_tokens": 4000}).param == "max_tokens"
    assert refused(COMPLETIONS, {"model": "m", "prompt": ["a"] * 64, "max_tokens": 600}).code == "output_budget_exceeded"
    assert refused(COMPLETIONS, {"model": "m", "prompt": ["a"] * 4000}).param == "max_tokens"  # vLLM's 16 each
    err = refused(CHAT, {"model": "m", "messages": [], "n": 16, "max_tokens": 2000, "logprobs": True,
                         "top_logprobs": 20})
    assert err.code == "logprobs_budget_exceeded"
    assert refused(COMPLETIONS, {"model": "m", "prompt": "a", "prompt_logprobs": -1}).param == "prompt_logprobs"
    assert refused(CHAT, {"model": "m", "messages": [], "top_logprobs": 21, "logprobs": True}).param == "top_logprobs"
    for spelling in (4000.0, "4000", " 4000 "):  # vLLM's pydantic reads each as 4000
        assert refused(CHAT, {"model": "m", "messages": [], "n": 16, "max_tokens": spelling}).param == "max_tokens"
    # A request with no bound gets its share of the budget, at most the context.
    body = {"model": "m", "messages": [], "n": 4}
    assert check_body(CHAT, body, caps=CAPS).choices == 4 and body["max_completion_tokens"] == 512
    body = {"model": "big", "input": "x"}
    check_body("/v1/responses", body, caps=RequestCaps({"big": 10**6}))
    assert body["max_output_tokens"] == 32_768
    body = {"model": "m", "prompt": "x", "max_tokens": None}  # an explicit null is "up to the context"
    check_body(COMPLETIONS, body, caps=CAPS)
    assert body["max_tokens"] == 512
    assert check_body(COMPLETIONS, {"model": "m", "prompt": ["a", "b"], "n": 3}, caps=CAPS).choices == 6


def test_requests_per_minute_count_choices():
    limiter, limits = RateLimiter(), Limits(rpm=10)
    limiter.admit("k", limits, 8).release()
    with pytest.raises(RateLimited) as info:
        limiter.admit("k", limits, 4)
    assert info.value.headers["x-ratelimit-remaining-requests"] == "2"
    limiter.admit("k", limits, 2).release()
    # A request larger than the whole limit runs alone in an empty window, never refused for ever.
    limiter2 = RateLimiter()
    limiter2.admit("k", limits, 16).release()
    with pytest.raises(RateLimited):
        limiter2.admit("k", limits, 1)


def test_batch_tokens_count_and_hold_the_key():
    limiter, limits = RateLimiter(), Limits(tpm=100)
    assert not limiter.over("k", limits)
    limiter.charge("k", 150)
    assert limiter.over("k", limits)
    with pytest.raises(RateLimited):
        limiter.admit("k", limits)


def test_tokens_per_minute_have_a_default():
    assert GatewaySettings(broker_direct=True).default_limits.tpm > 0


@pytest.mark.parametrize("name", ["\u2603.jsonl", "a\x00b.jsonl", 'q"uote\\ \u00e9\r\n.jsonl', ""])
def test_any_file_name_makes_a_valid_header(name):
    value = content_disposition(name)
    value.encode("ascii")
    assert not any(c in value for c in "\x00\r\n")
    assert "filename*=UTF-8''" in value


def test_swagger_ui_is_off_unless_asked_for():
    client = TestClient(create_app(GatewaySettings(broker_direct=True)))
    assert client.get("/docs").status_code == 404
    assert client.get("/openapi.json").status_code == 200
    on = TestClient(create_app(GatewaySettings(broker_direct=True, api_docs=True)))
    assert on.get("/docs").status_code == 200


@pytest.fixture
def slow_server() -> Iterator[int]:
    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=http_protocol(0.5), lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except ConnectionResetError:
        return True
    except (TimeoutError, socket.timeout):
        return False


def test_request_heads_have_a_deadline(slow_server):
    silent = socket.create_connection(("127.0.0.1", slow_server))
    half = socket.create_connection(("127.0.0.1", slow_server))
    half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    trickle = socket.create_connection(("127.0.0.1", slow_server))
    trickle.sendall(b"GET / HTTP/1.1\r\nX-Slow: ")
    cut = None
    for i in range(40):
        try:
            trickle.sendall(b"a")
        except OSError:
            cut = i
            break
        time.sleep(0.1)
    assert cut is not None and _closed_within(silent, 2) and _closed_within(half, 2)
    # A client that sends its head in time is served, also its next request on the same connection.
    with httpx.Client(base_url=f"http://127.0.0.1:{slow_server}") as client:
        assert client.get("/").text == "ok"
        time.sleep(0.8)  # idle between requests: keep-alive's business (5 s), not the head deadline's
        assert client.get("/").text == "ok"
