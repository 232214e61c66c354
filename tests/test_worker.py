"""The GPU worker against a real RabbitMQ node and the real vLLM CPU engine on the tiny model."""

from __future__ import annotations

import pytest
import pytest_asyncio

from broker_config.messages import Delta, Error, Final, Started
from conftest import SERVED_MODEL
from support.amqp_client import TestGatewayClient


@pytest_asyncio.fixture(scope="module")
async def gw(broker, served_worker):
    async with TestGatewayClient(broker.url("gateway")) as client:
        yield client


def split(frames):
    started = [f for f in frames if isinstance(f, Started)]
    deltas = [f for f in frames if isinstance(f, Delta)]
    ends = [f for f in frames if isinstance(f, (Final, Error))]
    return started, deltas, ends


async def test_stream_is_coalesced_and_usage_matches(gw):
    req = gw.request(SERVED_MODEL, stream=True, max_tokens=64, ignore_eos=True)
    frames = await gw.generate(req)
    started, deltas, (final,) = split(frames)
    print([d.tokens for d in deltas])
    assert len(started) == 1 and frames[0] is started[0]
    assert [f.seq for f in frames] == list(range(len(frames)))
    assert isinstance(final, Final)
    assert final.usage.completion_tokens == 64 == sum(d.tokens for d in deltas)
    assert final.usage.prompt_tokens == started[0].prompt_tokens > 0
    assert final.choices[0].finish_reason == "length"
    assert len(deltas) < 64
