"""What vLLM's OpenAI server answers, chatai answers: tools, structured outputs, the Responses
API, models, media rules and vLLM's own extensions, through the official OpenAI SDK.

Gateway -> RabbitMQ -> the session's real vLLM worker (CPU build) on the tiny model, which has a
Hermes-style tool-capable chat template and is served with ``--tool-call-parser hermes
--enable-auto-tool-choice`` (conftest). Its weights are random, so these checks are ones a
random model passes on a correct server because vLLM enforces them: a named or required tool
call, a JSON schema, a choice or a regex are constrained by grammar; the rest is the API's shape.
Greedy decoding (temperature 0) keeps every answer deterministic.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

import openai
import pytest

from conftest import SERVED_ADAPTER, SERVED_MODEL

GREEDY = {"temperature": 0}
# Grammar-constrained answers: sampled with a fixed seed (as reproducible as greedy, which can
# repeat one token of a random model until max_tokens).
SEEDED = {"temperature": 1.0, "seed": 11}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "strict": True,  # vLLM constrains the arguments to the schema of a strict tool
        "parameters": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
                       "required": ["city"], "additionalProperties": False},
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "strict": True, "parameters": {"type": "object", "properties": {
        "zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}},
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(gateway):
    return gateway.client(timeout=120)


def _args(call) -> dict:
    return json.loads(call.function.arguments)


# ------------------------------------------------------------------ tools


def test_a_named_tool_choice_calls_that_tool_with_schema_valid_arguments(client):
    out = client.chat.completions.create(model=SERVED_MODEL, messages=USER, tools=[WEATHER, TIME], max_tokens=100,
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                         **SEEDED)
    (call,) = out.choices[0].message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert _args(call)["city"] in ("Paris", "Rome")
    plain = client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=1)
    assert out.usage.prompt_tokens > plain.usage.prompt_tokens + 10  # the template named the tools


def test_required_tool_choice_streams_tool_call_deltas(client):
    stream = client.chat.completions.create(model=SERVED_MODEL, messages=USER, tools=[WEATHER, TIME],
                                            tool_choice="required", max_tokens=400, stream=True,
                                            **{**SEEDED, "seed": 1})
    names, arguments = {}, {}
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.function and d.function.name:
                    names[d.index] = d.function.name
                if d.function and d.function.arguments:
                    arguments[d.index] = arguments.get(d.index, "") + d.function.arguments
    assert names and set(names.values()) <= {"get_weather", "get_time"}
    for i, name in names.items():
        args = json.loads(arguments[i])
        assert args in ({"city": "Paris"}, {"city": "Rome"}) if name == "get_weather" else args["zone"] in ("UTC", "CET")


def test_auto_tool_choice_is_accepted_streamed_and_whole(client):
    whole = client.chat.completions.create(model=SERVED_MODEL, messages=USER, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=16, **GREEDY)
    assert whole.choices[0].finish_reason in ("stop", "length", "tool_calls")
    chunks = list(client.chat.completions.create(model=SERVED_MODEL, messages=USER, tools=[WEATHER],
                                                 max_tokens=16, stream=True, **GREEDY))
    assert chunks[-1].choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_a_conversation_with_tool_calls_and_tool_results_reaches_the_template(client):
    """An assistant turn's tool_calls and the tool's answer are part of the prompt (not dropped)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    history = [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."}]
    with_calls = client.chat.completions.create(model=SERVED_MODEL, messages=history, tools=[WEATHER],
                                                max_tokens=4, **GREEDY)
    without = client.chat.completions.create(model=SERVED_MODEL, messages=[*USER, {"role": "assistant", "content": ""},
                                                                            history[2]],
                                             tools=[WEATHER], max_tokens=4, **GREEDY)
    assert with_calls.usage.prompt_tokens > without.usage.prompt_tokens + 8


# ------------------------------------------------------------------ structured outputs


def test_response_format_json_schema_is_followed(client):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}, "sure": {"type": "boolean"}},
              "required": ["answer", "sure"], "additionalProperties": False}
    out = client.chat.completions.create(
        model=SERVED_MODEL, messages=USER, max_tokens=200, **SEEDED,
        response_format={"type": "json_schema", "json_schema": {"name": "reply", "strict": True, "schema": schema}})
    data = json.loads(out.choices[0].message.content)
    assert set(data) == {"answer", "sure"} and isinstance(data["answer"], int) and isinstance(data["sure"], bool)


def test_response_format_json_object_is_json(client):
    out = client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=300, **SEEDED,
                                         response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop", "the grammar must close the object"
    assert isinstance(json.loads(out.choices[0].message.content), dict)


def test_vllms_structured_outputs_choice_and_regex_constrain_the_answer(client):
    choice = client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=10, **GREEDY,
                                            extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(model=SERVED_MODEL, prompt="Code:", max_tokens=10, **GREEDY,
                                      extra_body={"structured_outputs": {"regex": "[0-9]{3}-[a-z]{2}"}})
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", regex.choices[0].text)


def test_vllm_extensions_reach_the_engine(client):
    """Fields the gateway does not know go through: prompt_logprobs and top_k are vLLM's."""
    out = client.completions.create(model=SERVED_MODEL, prompt="The cluster is", max_tokens=2, **GREEDY,
                                    extra_body={"prompt_logprobs": 1})
    assert out.choices[0].prompt_logprobs, "vLLM's prompt logprobs came back"
    greedy = client.completions.create(model=SERVED_MODEL, prompt="Once", max_tokens=12, temperature=0,
                                       extra_body={"ignore_eos": True})
    top1 = client.completions.create(model=SERVED_MODEL, prompt="Once", max_tokens=12, temperature=1.5, seed=5,
                                     extra_body={"ignore_eos": True, "top_k": 1})
    assert top1.choices[0].text == greedy.choices[0].text  # top_k=1 is greedy, whatever the temperature


def test_vllms_own_refusals_keep_their_status(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=SERVED_MODEL, messages=USER, max_tokens=10,
                                       extra_body={"structured_outputs": {"choice": ["a"], "regex": "b"}})
    assert exc.value.status_code == 400
    with pytest.raises(openai.BadRequestError):  # a tool_choice naming no tool
        client.chat.completions.create(model=SERVED_MODEL, messages=USER, tools=[WEATHER], max_tokens=10,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


# ------------------------------------------------------------------ Responses API, models, media


def test_responses_api_whole_and_streamed(client):
    out = client.responses.create(model=SERVED_MODEL, input="Hello there", max_output_tokens=8, **GREEDY)
    assert out.object == "response" and out.output_text and out.usage.output_tokens == 8
    events = [e.type for e in client.responses.create(model=SERVED_MODEL, input="Hello", max_output_tokens=8,
                                                      stream=True, **GREEDY)]
    assert events[0] == "response.created" and "response.output_text.delta" in events
    assert events[-1] in ("response.completed", "response.incomplete")


def test_responses_api_is_stateless_and_says_so(client):
    for extra in ({"store": True}, {"previous_response_id": "resp_1"}, {"background": True}):
        with pytest.raises(openai.BadRequestError) as exc:
            client.responses.create(model=SERVED_MODEL, input="Hello", max_output_tokens=4, **extra)
        assert next(iter(extra)) in exc.value.message


def test_a_model_is_retrieved_by_its_id(client):
    assert client.models.retrieve(SERVED_MODEL).id == SERVED_MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_media_by_remote_url_is_refused_and_inline_media_reaches_vllm(client):
    def ask(url: str):
        return client.chat.completions.create(model=SERVED_MODEL, max_tokens=4, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": url}}]}])

    with pytest.raises(openai.BadRequestError) as exc:
        ask("https://example.org/cat.png")
    assert "data: URL" in exc.value.message and exc.value.body["param"] == "messages[0]"
    # 1x1 PNG, inline: the gateway lets it through; the text-only tiny model is vLLM's to refuse.
    png = base64.b64encode(bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000""1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")).decode()
    with pytest.raises(openai.BadRequestError) as exc:
        ask(f"data:image/png;base64,{png}")
    assert "data: URL" not in exc.value.message  # not the gateway's refusal: vLLM's, with its status


# ------------------------------------------------------------------ fine-tuned variants (LoRA)


def test_a_lora_adapter_is_a_model_of_its_own_routed_to_its_base_models_workers(client):
    models = {m.id: m for m in client.models.list().data}
    assert SERVED_ADAPTER in models and models[SERVED_ADAPTER].model_extra["parent"] == SERVED_MODEL
    assert client.models.retrieve(SERVED_ADAPTER).model_extra["root"] == SERVED_MODEL

    def answer(model: str) -> str:
        return client.completions.create(model=model, prompt="Once upon a time", max_tokens=12,
                                          extra_body={"ignore_eos": True}, **GREEDY).choices[0].text

    base, tuned = answer(SERVED_MODEL), answer(SERVED_ADAPTER)
    assert tuned != base, "the adapter's weights changed the answer"
    assert answer(SERVED_ADAPTER) == tuned  # and it is the adapter's, every time
    chunks = list(client.chat.completions.create(model=SERVED_ADAPTER, messages=USER, max_tokens=4, stream=True))
    assert chunks and all(c.model == SERVED_ADAPTER for c in chunks)


# ------------------------------------------------------------------ embeddings (a worker in pooling mode)

EMBED_MODEL = "tiny-embed"


@pytest.fixture(scope="module")
def embed_worker(broker, gateway, tiny_model_dir, tmp_path_factory):
    """The tiny model's weights served as an embedding model (vLLM's pooling runner)."""
    from support.worker_proc import start_worker

    broker.apply([EMBED_MODEL])
    worker = start_worker(tiny_model_dir, EMBED_MODEL, broker.url("worker"),
                          tmp_path_factory.mktemp("embed-worker") / "worker.log", worker_id=f"embed-{os.getpid()}",
                          extra_args=["--runner", "pooling", "--convert", "embed"])
    try:
        worker.wait_ready()
        gateway.wait_for(lambda h: h["models"].get(EMBED_MODEL, {}).get("ready", 0) >= 1, timeout=60,
                         what="the embedding worker's heartbeat")
    except BaseException:
        worker.kill()
        raise
    yield worker
    worker.stop(timeout=60)


def test_embeddings_from_a_pooling_worker(client, embed_worker):
    out = client.embeddings.create(model=EMBED_MODEL, input=["hello there", "the cluster is busy"])
    assert [d.index for d in out.data] == [0, 1]
    assert all(len(d.embedding) == 128 for d in out.data)  # the tiny model's hidden size
    assert out.data[0].embedding != out.data[1].embedding
    assert out.usage.prompt_tokens > 2
    with pytest.raises(openai.NotFoundError) as exc:  # a generating model serves no embeddings
        client.embeddings.create(model=SERVED_MODEL, input="hello")
    assert "does not serve" in exc.value.message


def test_a_batch_takes_every_endpoint_the_workers_serve(client, embed_worker):
    """One batch per endpoint (OpenAI's rule), each line answered by vLLM as the endpoint would."""
    def run(endpoint: str, bodies: list[dict]) -> dict:
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": endpoint, "body": b} for i, b in enumerate(bodies)]
        f = client.files.create(file=("in.jsonl", "\n".join(json.dumps(x) for x in lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint=endpoint, completion_window="24h")
        deadline = time.monotonic() + 180
        while batch.status not in ("completed", "failed", "expired", "cancelled") and time.monotonic() < deadline:
            time.sleep(0.3)
            batch = client.batches.retrieve(batch.id)
        assert batch.status == "completed", (batch.status, batch.errors)
        results = [json.loads(x) for x in client.files.content(batch.output_file_id).text.splitlines()]
        return {r["custom_id"]: r["response"] for r in results}

    named = {"type": "function", "function": {"name": "get_weather"}}
    chat = run("/v1/chat/completions", [
        {"model": SERVED_MODEL, "messages": USER, "tools": [WEATHER], "tool_choice": named, "max_tokens": 100, **SEEDED},
        {"model": SERVED_ADAPTER, "messages": USER, "max_tokens": 4}])
    assert chat["c0"]["status_code"] == 200
    assert chat["c0"]["body"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert chat["c1"]["body"]["model"] == SERVED_ADAPTER
    responses = run("/v1/responses", [{"model": SERVED_MODEL, "input": "Hello", "max_output_tokens": 4}])
    assert responses["c0"]["body"]["object"] == "response"
    embeddings = run("/v1/embeddings", [{"model": EMBED_MODEL, "input": "hello"}])
    assert len(embeddings["c0"]["body"]["data"][0]["embedding"]) == 128
