"""broker_config.timing's race and loop: what the gateway, the worker and the tools rely on."""

from __future__ import annotations

import asyncio
import logging

from broker_config.timing import first_of, pause, run_periodically

log = logging.getLogger("test")


async def _ends(seconds: float, ended: list[str], name: str) -> str:
    try:
        await asyncio.sleep(seconds)
        return name
    finally:
        ended.append(name)


async def test_first_of_returns_the_first_and_leaves_nothing_running():
    ended: list[str] = []
    fast = asyncio.ensure_future(_ends(0.01, ended, "fast"))
    slow = asyncio.ensure_future(_ends(10, ended, "slow"))
    done = await first_of(fast, slow)
    assert done == {fast} and fast.result() == "fast"
    assert slow.cancelled() and ended == ["fast", "slow"]  # the loser has ended, not just been told


async def test_first_of_times_out_with_nothing_done():
    ended: list[str] = []
    assert await first_of(_ends(10, ended, "a"), _ends(10, ended, "b"), timeout=0.01) == set()
    assert sorted(ended) == ["a", "b"]


async def test_first_of_cancelled_cancels_all_but_a_shielded_shared_future():
    ended: list[str] = []
    shared = asyncio.get_running_loop().create_future()
    racer = asyncio.ensure_future(first_of(_ends(10, ended, "a"), asyncio.shield(shared)))
    await asyncio.sleep(0.01)
    racer.cancel()
    await asyncio.gather(racer, return_exceptions=True)
    assert racer.cancelled() and ended == ["a"] and not shared.done()


async def test_pause_ends_early_on_an_event():
    event = asyncio.Event()
    asyncio.get_running_loop().call_later(0.01, event.set)
    await asyncio.wait_for(pause(10, event), timeout=2)


async def test_run_periodically_asks_a_callable_interval_and_stops_on_its_event():
    stop, steps, pauses = asyncio.Event(), [], []

    def step() -> None:
        steps.append(1)
        if len(steps) == 3:
            stop.set()

    def interval() -> float:
        pauses.append(1)
        return 0.01

    await asyncio.wait_for(run_periodically(step, interval, what="test", logger=log, stop=stop), timeout=2)
    assert len(steps) == 3 and len(pauses) == 2  # no pause after the step that stopped it


def test_a_sync_wait_refuses_an_async_condition_instead_of_passing_at_once():
    """A coroutine is truthy: polled without being awaited, it would end the wait having
    checked nothing. The test helper runs such a condition in a loop of its own."""
    import pytest

    from broker_config.timing import wait_until
    from support.waiting import wait_until as test_wait_until

    calls: list[int] = []

    async def ready() -> bool:
        calls.append(1)
        return len(calls) >= 3

    with pytest.raises(TypeError, match="async"):
        wait_until(ready, timeout=1, what="an async condition")
    assert test_wait_until(ready, timeout=5, what="an async condition", every=0.01) is True
    assert len(calls) == 3
