"""The gateway's blocked-publisher tracker (gateway/cluster/broker_alarm.py), without a broker.

The real frames come from RabbitMQ in tests/faults/test_broker_alarms.py; here the tracker's
own rules: a publish racing a block is given up, a blocked connection refuses at once, and
an unblock or a new connection lets publishes through again.
"""

from __future__ import annotations

import asyncio

import pytest

from gateway.cluster.broker_alarm import BlockedTracker, alarm_kind
from gateway.cluster.errors import ClusterOverloaded
from gateway.errors import to_api_error


def test_alarm_kind_from_the_brokers_reason():
    assert alarm_kind("low on disk") == "disk"
    assert alarm_kind("low on memory") == "memory"
    assert alarm_kind("low on something") == "other"
    assert alarm_kind(None) is None


async def test_a_publish_that_meets_a_block_is_given_up_and_later_ones_refused():
    tracker = BlockedTracker()
    assert await tracker.guard(asyncio.sleep(0, result="confirmed")) == "confirmed"
    never_confirmed = asyncio.get_running_loop().create_future()
    pending = asyncio.ensure_future(tracker.guard(never_confirmed))
    await asyncio.sleep(0)
    tracker._set("low on disk")  # what the connection.blocked handler does
    with pytest.raises(ClusterOverloaded) as err:
        await pending
    answer = to_api_error(err.value)  # what the client gets
    assert (answer.status, answer.code) == (503, "cluster_overloaded")
    assert "low on disk" in answer.message and never_confirmed.cancelled()
    assert tracker.status()["alarm"] == "disk"
    with pytest.raises(ClusterOverloaded):
        await tracker.guard(asyncio.sleep(0))  # refused without waiting
    tracker._set(None)  # connection.unblocked
    assert tracker.status() is None
    assert await tracker.guard(asyncio.sleep(0, result=1)) == 1
    tracker._set("low on memory")
    tracker.connection_lost()  # a new connection starts unblocked
    assert not tracker.blocked
