"""One ``wait_until`` for tests, sync and async: poll a condition, fail saying what never happened.

In a coroutine, ``await wait_until(...)`` (the event loop keeps running meanwhile; the predicate
may be async); in plain code, ``wait_until(...)`` blocks (``chatai.devstack``'s own poll).
Both raise TimeoutError naming ``what``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from chatai.devstack.processes import wait_until as wait_blocking

T = TypeVar("T")


def wait_until(pred: Callable[[], T | Awaitable[T]], timeout: float = 10.0, what: str = "condition",
               every: float = 0.1):
    """Poll ``pred`` until it returns something truthy and return that; after ``timeout``, fail.

    Inside a running event loop this returns a coroutine to await; elsewhere it blocks.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return wait_blocking(pred, timeout, what, every)
    return _wait_async(pred, timeout, what, every)


async def _wait_async(pred: Callable[[], T | Awaitable[T]], timeout: float, what: str, every: float) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(every)
