"""The OpenAI parameters the gateway validates itself: logit_bias, token-id and multi-prompt
completions, echo with logprobs. An interactive body and a batch line go through the same
models, so each case is checked on both paths: both accept, or both refuse with the same 400.
"""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker_config.messages import (ChoiceEnd, Delta, Final, GenerateRequest, TokenLogprob, TopLogprob, Usage,
                                    decode_frames, encode_frames)
from gateway.batches.validation import parse_body
from gateway.errors import APIError, install_error_handlers
from gateway.formatting import ResponseBuilder
from gateway.schemas import MAX_CHOICES, MAX_LOGIT_BIAS, MAX_PROMPTS, ChatCompletionRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


def _app() -> TestClient:
    """The gateway's request models and error handlers, on routes that answer what they parsed."""
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> dict:
        body.check_supported()
        return {"sampling": body.sampling().model_dump(mode="json"), **body.wire_fields()}

    @app.post("/v1/chat/completions")
    def chat(body: ChatCompletionRequest) -> dict:
        body.check_supported()
        return {"sampling": body.sampling().model_dump(mode="json"), **body.wire_fields()}

    return TestClient(app)


@pytest.fixture(scope="module")
def http() -> TestClient:
    return _app()


def _both(http: TestClient, kind: str, body: dict) -> tuple[int, dict, dict | APIError]:
    """The endpoint's answer and the batch path's, for the same body."""
    r = http.post("/v1/chat/completions" if kind == "chat" else "/v1/completions", json=body)
    try:
        line: dict | APIError = parse_body(kind, body)
    except APIError as exc:
        line = exc
    return r.status_code, r.json(), line


GOOD = [
    ("completion", {"model": "tiny", "prompt": [1, 2, 3]}, {"prompts": [[1, 2, 3]]}),
    ("completion", {"model": "tiny", "prompt": [[1, 2], [3]]}, {"prompts": [[1, 2], [3]]}),
    ("completion", {"model": "tiny", "prompt": ["a", "b"], "n": 2}, {"prompts": ["a", "b"]}),
    ("completion", {"model": "tiny", "prompt": "one"}, {"prompt": "one"}),
    ("completion", {"model": "tiny", "prompt": ["one"]}, {"prompt": "one"}),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"5": -100, "7": 100}}, {"prompt": "x"}),
    ("chat", {"model": "tiny", "messages": CHAT, "logit_bias": {"0": 2.5}}, {"messages": CHAT}),
]


@pytest.mark.parametrize("kind,body,wire", GOOD)
def test_accepted_on_both_paths(http, kind, body, wire):
    status, answer, line = _both(http, kind, body)
    assert status == 200, answer
    assert not isinstance(line, APIError)
    for key, value in wire.items():
        assert answer[key] == value and line[key] == value
    GenerateRequest(request_id="r", reply_to="q", **line)  # a batch line makes a valid wire request
    if "logit_bias" in body:
        assert answer["sampling"]["logit_bias"] == {k: float(v) for k, v in body["logit_bias"].items()}


BAD = [
    ("completion", {"model": "tiny", "prompt": [1, -2]}, "prompt", "token ids"),
    ("completion", {"model": "tiny", "prompt": [[1], []]}, "prompt", "must not be empty"),
    ("completion", {"model": "tiny", "prompt": []}, "prompt", "not empty"),
    ("completion", {"model": "tiny", "prompt": [1, 2.5]}, "prompt", "strings or only lists"),
    ("completion", {"model": "tiny", "prompt": [1, True]}, "prompt", "strings or only lists"),
    ("completion", {"model": "tiny", "prompt": ["a", [1]]}, "prompt", "only strings or only lists"),
    ("completion", {"model": "tiny", "prompt": [2**40]}, "prompt", "token ids"),
    ("completion", {"model": "tiny", "prompt": ["p"] * (MAX_PROMPTS + 1)}, "prompt", f"at most {MAX_PROMPTS}"),
    ("completion", {"model": "tiny", "prompt": ["p"] * 16, "n": MAX_CHOICES // 16 + 1}, None, f"{MAX_CHOICES}"),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"5": 100.5}}, "logit_bias", "-100 and 100"),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"5": -101}}, "logit_bias", "-100 and 100"),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"hello": 1}}, "logit_bias", "token ids"),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"-3": 1}}, "logit_bias", "token ids"),
    ("completion", {"model": "tiny", "prompt": "x", "logit_bias": {"1": "much"}}, "logit_bias.1", "number"),
    ("chat", {"model": "tiny", "messages": CHAT, "logit_bias": {str(i): 1 for i in range(MAX_LOGIT_BIAS + 1)}},
     "logit_bias", f"at most {MAX_LOGIT_BIAS}"),
    ("chat", {"model": "tiny", "messages": CHAT, "logit_bias": {"1.5": 1}}, "logit_bias", "token ids"),
]


@pytest.mark.parametrize("kind,body,param,words", BAD)
def test_refused_alike_on_both_paths(http, kind, body, param, words):
    status, answer, line = _both(http, kind, body)
    assert status == 400, answer
    err = answer["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and words in err["message"]
    assert isinstance(line, APIError) and line.status == 400
    assert line.body()["error"]["param"] == param and words in line.message


def test_echo_with_logprobs_asks_for_prompt_logprobs():
    body = CompletionRequest.model_validate({"model": "tiny", "prompt": "x", "echo": True, "logprobs": 2})
    assert body.sampling().prompt_logprobs is True
    for other in ({"echo": True}, {"logprobs": 2}):
        assert CompletionRequest.model_validate({"model": "tiny", "prompt": "x", **other}).sampling().prompt_logprobs is False


def _lp(token: str, logprob: float | None) -> TokenLogprob:
    tops = [] if logprob is None else [TopLogprob(token=token, logprob=logprob)]
    return TokenLogprob(token=token, logprob=logprob, top_logprobs=tops)


def test_prompt_logprobs_come_first_in_the_openai_shape():
    prompt = [_lp("The", None), _lp(" sky", -2.0)]
    gen = [_lp(" is", -0.5)]
    final = Final(request_id="r", choices=[ChoiceEnd(index=0, finish_reason="length", text="The sky is",
                                                     logprobs=gen, prompt_logprobs=prompt)], usage=Usage())
    assert decode_frames(encode_frames([final])) == [final]  # the first token's None survives the wire
    lp = ResponseBuilder("completion", "r", "tiny").completion(final)["choices"][0]["logprobs"]
    assert lp["tokens"] == ["The", " sky", " is"]
    assert lp["token_logprobs"] == [None, -2.0, -0.5]
    assert lp["top_logprobs"] == [None, {" sky": -2.0}, {" is": -0.5}]
    assert lp["text_offset"] == [0, 3, 7]
    # Streamed: the prompt's tokens ride in the choice's first chunk; offsets go on from there.
    builder = ResponseBuilder("completion", "r", "tiny")
    first = builder.delta_chunk(Delta(request_id="r", index=1, text="The sky is", tokens=1, logprobs=gen,
                                      prompt_logprobs=prompt))["choices"][0]
    later = builder.delta_chunk(Delta(request_id="r", index=1, text=" blue", tokens=1,
                                      logprobs=[_lp(" blue", -1.0)]))["choices"][0]
    assert first["index"] == 1 and first["logprobs"]["token_logprobs"] == [None, -2.0, -0.5]
    assert later["logprobs"]["tokens"] == [" blue"] and later["logprobs"]["text_offset"] == [10]


def test_wire_request_counts_choices_per_prompt():
    one = GenerateRequest(request_id="r", model="m", kind="completion", prompt="x", reply_to="q")
    several = GenerateRequest.model_validate_json(GenerateRequest(
        request_id="r", model="m", kind="completion", prompts=["a", [1, 2], "c"], reply_to="q",
        sampling={"n": 2, "logit_bias": {7: -5.0}}).encode())
    assert one.prompt_list() == ["x"] and one.choice_count == 1
    assert several.prompt_list() == ["a", [1, 2], "c"] and several.choice_count == 6
    assert several.sampling.logit_bias == {7: -5.0}
