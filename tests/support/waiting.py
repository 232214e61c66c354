"""One ``wait_until`` for tests, sync and async, on the same poll as production code
(``broker_config.timing``): poll a condition, fail saying what never happened.

In a coroutine, ``await wait_until(...)`` (the event loop keeps running meanwhile; the predicate
may be async); in plain code, ``wait_until(...)`` blocks (an async predicate runs in a loop of
its own). Both raise TimeoutError naming ``what``.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import TypeVar

from broker_config.timing import await_until
from broker_config.timing import wait_until as wait_until_sync

T = TypeVar("T")

__all__ = ["wait_until", "wait_until_sync"]


def wait_until(pred: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "condition",
               every: float = 0.1):
    """Inside a running event loop this returns a coroutine to await; elsewhere it blocks."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        if inspect.iscoroutinefunction(pred):  # its coroutine would be truthy, and never run
            return asyncio.run(await_until(pred, timeout, what, every))
        return wait_until_sync(pred, timeout, what, every)  # type: ignore[arg-type]
    return await_until(pred, timeout, what, every)
