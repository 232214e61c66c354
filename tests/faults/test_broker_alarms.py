"""Broker resource alarms: a real disk or memory alarm on the session's RabbitMQ node.

The node blocks every publishing connection (the gateway's and the workers'). Promised:
the gateway answers 503 ``cluster_overloaded`` (not "paused", which blames the tunnel or the
breaker) as soon as the broker says it is blocked, not after the publish timeout; ``/health``
says which alarm; batch lines wait instead of failing; everything resumes by itself when the
alarm clears, and the batch completes exactly once.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import SERVED_MODEL
from support.faults import (
    assert_batch_exactly_once,
    error_code,
    finished_batch,
    resource_alarm,
    submit_batch,
    wait_for,
)

CHAT = dict(model=SERVED_MODEL, messages=[{"role": "user", "content": "Are you there?"}], max_tokens=4)


def _overloaded(call) -> float:
    """Run a request that must be refused as overloaded; the seconds it took."""
    t0 = time.monotonic()
    with pytest.raises(openai.APIStatusError) as err:
        call()
    took = time.monotonic() - t0
    assert err.value.status_code == 503, err.value
    # The code and the words say overloaded; a publish timeout would have said service_paused.
    assert error_code(err.value) == "cluster_overloaded", err.value.body
    message = err.value.message.lower()
    assert "overloaded" in message and "tunnel" not in message and "breaker" not in message
    return took


@pytest.mark.parametrize("kind", ["disk", "memory"])
def test_alarm_answers_overloaded_and_service_resumes_when_it_clears(gateway, broker, kind):
    client = gateway.client(timeout=60)
    assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
    prefix, n = f"alarm-{kind}", 12
    log_mark = "publishing paused (ClusterOverloaded)"
    paused_before = gateway.log_path.read_text(errors="replace").count(log_mark)
    with resource_alarm(broker.admin, kind):
        # The first publish runs into the block; the broker says so at once.
        first = _overloaded(lambda: client.chat.completions.create(**CHAT))
        health = gateway.health()
        assert health["status"] == "overloaded"
        assert health["broker"]["connected"] is True  # the tunnel and broker are fine
        assert health["broker"]["blocked"]["alarm"] == kind, health
        assert httpx.get(gateway.base_url + "/health", timeout=5).status_code == 503
        # Later requests are refused without publishing, streamed ones too.
        later = _overloaded(lambda: client.chat.completions.create(**CHAT))
        streamed = _overloaded(lambda: list(client.chat.completions.create(stream=True, **CHAT)))
        print(f"\n{kind} alarm: 503 cluster_overloaded after {first * 1000:.0f} ms (first publish), "
              f"{later * 1000:.0f} ms, {streamed * 1000:.0f} ms (streamed); the publish timeout is 10 s")
        # A batch submitted during the alarm waits: its lines go back to pending, none fails.
        batch = submit_batch(client, SERVED_MODEL, n, prefix)
        wait_for(lambda: gateway.log_path.read_text(errors="replace").count(log_mark) > paused_before, 60,
                 "the batch dispatcher to be refused by the alarm")
        mid = client.batches.retrieve(batch.id)
        assert mid.status == "in_progress" and mid.request_counts.failed == 0, mid
    # Cleared: the broker unblocks the connection and the gateway serves again, untouched.
    health = gateway.wait_for(lambda h: h["status"] == "ok", timeout=30, what="the block to lift")
    assert health["broker"]["blocked"] is None
    assert client.chat.completions.create(**CHAT).choices[0].message.content is not None
    assert_batch_exactly_once(client, finished_batch(client, batch.id), n, prefix)
