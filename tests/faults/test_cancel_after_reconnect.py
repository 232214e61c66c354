"""The gateway's broker connection drops under a running generation (the broker closes it, as on
a network blip or a cut tunnel) while the worker's own connection stays up.

Promised: the stream ends at once with an error event (its frames went with the gateway's
exclusive reply queue), and once the connection is back the gateway sends the cancellation it
could not send while it was down, so the worker stops generating for a client that is gone
instead of running to the end (docs/reliability.md, "Cancellations across an outage").
"""

from __future__ import annotations

import re

import openai

from conftest import SERVED_MODEL
from support.breaker_env import add_gateway_like_user
from support.faults import error_code, gateway_serving, wait_for

N, TOKENS = 16, 480  # with 20 top logprobs each: seconds of decoding, well past a 0.2 s reconnect


def _finished_line(worker, request_id: str) -> str | None:
    """The worker's log line for a request it has finished with (it holds completion_tokens=)."""
    lines = [ln for ln in worker.log_text().splitlines()
             if "completion_tokens=" in ln and f"request_id={request_id}" in ln]
    return lines[-1] if lines else None


def test_a_generation_cut_off_by_a_lost_connection_is_cancelled_once_it_returns(broker, served_worker, tmp_path):
    user = add_gateway_like_user(broker)  # its own broker user: closing its connections touches no one else
    try:
        env = {"CHATAI_GATEWAY_BROKER_RECONNECT_INTERVAL": "0.2", "CHATAI_GATEWAY_QUEUE_TIMEOUT": "30",
               # 16 choices x 480 tokens x 21 logprobs: over the default logprobs budget on purpose.
               "CHATAI_GATEWAY_MAX_LOGPROB_TOKENS": "200000"}
        with gateway_serving(tmp_path / "gw", user.url(), SERVED_MODEL, env=env) as gw:
            gw.wait_for(lambda h: h["models"][SERVED_MODEL].get("in_flight", -1) == 0, timeout=120,
                        what="an idle worker")
            request_id, code = None, None
            stream = gw.client(timeout=120).chat.completions.create(
                model=SERVED_MODEL, messages=[{"role": "user", "content": "Tell me a long story."}], stream=True,
                n=N, max_tokens=TOKENS, logprobs=True, top_logprobs=20, extra_body={"ignore_eos": True})
            try:
                for chunk in stream:
                    if request_id is None and chunk.choices and chunk.choices[0].delta.content:
                        request_id = chunk.id.removeprefix("chatcmpl-")
                        broker.admin.close_user_connections(user.name, "test: the gateway's connection is lost")
            except openai.APIError as exc:  # the error event that ends the stream
                code = error_code(exc)
            assert request_id is not None, "no token streamed before the stream ended"
            assert code == "service_paused"
            line = wait_for(lambda: _finished_line(served_worker, request_id), 120,
                            "the worker to end the cut-off request")
            generated = int(re.search(r"completion_tokens=(\d+)", line).group(1))
            print(f"\nthe worker generated {generated} of {N * TOKENS} tokens for the cut-off stream")
            assert f"cancel request_id={request_id}" in served_worker.log_text(), line
            assert generated < N * TOKENS, "the generation ran to the end: the held cancellation never arrived"
            assert "cancellation(s) held while the broker connection was down" in gw.log_text()
    finally:
        user.delete()
