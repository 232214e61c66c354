"""Retrying, repeating and waiting: the timing primitives every component uses, written once.

- ``Backoff``: the one retry delay policy (exponential, capped, optionally jittered, or fixed).
- ``retry`` / ``retry_async``: call until it works, sleeping ``Backoff`` delays in between.
- ``first_of``: run awaitables side by side until the first ends, then cancel the others and
  wait until they are gone (a race with nothing left running behind it).
- ``pause``: sleep, or less if an event is set.
- ``run_periodically``: a background loop that runs a step every interval (fixed, or asked of a
  function after each step), survives a failing step, stops on an event and can be woken early.
- ``wait_until`` / ``await_until``: poll a condition until it holds, or fail saying what never
  happened (readiness polls in code and tests alike).

They live beside the wire contract because the gateway, the worker, the operator tools and
the tests all import ``broker_config``; none of them depends on another.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass
class Backoff:
    """Delays between attempts: ``initial``, times ``factor`` after each one, at most ``maximum``.

    With ``jitter`` half the delay is random (reconnecting clients do not stampede together).
    ``reset()`` after a success starts again from ``initial``.
    """

    initial: float
    maximum: float
    factor: float = 2.0
    jitter: bool = False
    attempt: int = 0

    @classmethod
    def fixed(cls, delay: float) -> "Backoff":
        return cls(delay, delay, factor=1.0)

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * self.factor ** min(self.attempt, 30))
        self.attempt += 1
        return ceiling / 2 + random.uniform(0, ceiling / 2) if self.jitter else ceiling

    def reset(self) -> None:
        self.attempt = 0


def retry(fn: Callable[[], T], backoff: Backoff, *, attempts: int,
          retry_on: tuple[type[BaseException], ...] = (Exception,)) -> T:
    """Call ``fn`` up to ``attempts`` times while it raises ``retry_on``; the last error propagates."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except retry_on:
            if attempt >= attempts:
                raise
        time.sleep(backoff.next())
    raise ValueError("attempts must be at least 1")


async def retry_async(fn: Callable[[], Awaitable[T]], backoff: Backoff, *,
                      on_failure: Callable[[Exception, float], None] | None = None,
                      sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> T:
    """Await ``fn()`` until it returns; after each failure call ``on_failure(error, delay)``
    and sleep ``delay``. Cancellation ends it."""
    while True:
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the caller's on_failure says what it was
            delay = backoff.next()
            if on_failure is not None:
                on_failure(exc, delay)
            await sleep(delay)


async def first_of(*aws: Awaitable[Any], timeout: float | None = None) -> set[asyncio.Future]:
    """Run ``aws`` side by side until the first of them ends (or ``timeout`` passes), then cancel
    the others and wait until they have ended too; the same when the caller is cancelled.

    Returns the ones that ended first (empty after a timeout): pass a task or future you hold
    to ask ``task in done`` and read its ``result()``. A future shared with others must be
    wrapped in ``asyncio.shield``, or it is cancelled with the rest.
    """
    futures = [asyncio.ensure_future(a) for a in aws]
    try:
        done, _ = await asyncio.wait(futures, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return done
    finally:
        for f in futures:
            if not f.done():
                f.cancel()
        await asyncio.gather(*futures, return_exceptions=True)


async def pause(seconds: float, *events: asyncio.Event) -> None:
    """Sleep ``seconds``, or less if any of ``events`` is set meanwhile."""
    if events:
        await first_of(*(e.wait() for e in events), timeout=seconds)
    else:
        await asyncio.sleep(seconds)


async def run_periodically(step: Callable[[], object], interval: float | Callable[[], float], *, what: str,
                           logger: logging.Logger, stop: asyncio.Event | None = None,
                           wake: asyncio.Event | None = None, error_pause: float = 0.0) -> None:
    """Run ``step`` (plain or async) every ``interval`` seconds until ``stop`` is set or the task
    is cancelled; a callable ``interval`` is asked for the next pause after each step. A failing
    step is logged (its type and traceback) and the loop goes on, after ``error_pause``; setting
    ``wake`` runs the next step at once."""
    while stop is None or not stop.is_set():
        try:
            result = step()
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("%s failed; retrying", what)
            if error_pause:
                await asyncio.sleep(error_pause)
        if stop is not None and stop.is_set():
            break
        seconds = interval() if callable(interval) else interval
        await pause(seconds, *(e for e in (stop, wake) if e is not None))
        if wake is not None:
            wake.clear()


class WaitTimeout(TimeoutError):
    """A condition did not hold in time; the message says which."""


def _expired(deadline: float | None, timeout: float | None, what: str) -> None:
    if deadline is not None and time.monotonic() > deadline:
        raise WaitTimeout(f"timed out after {timeout:g} s waiting for {what}")


def wait_until(pred: Callable[[], T], timeout: float | None = 10.0, what: str = "condition",
               every: float = 0.1) -> T:
    """Poll ``pred`` until it returns something truthy (returned); WaitTimeout after ``timeout``
    seconds (None: wait for ever)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):  # truthy, and never run: the wait would check nothing
            if inspect.iscoroutine(value):
                value.close()
            raise TypeError(f"wait_until({what!r}): the condition is async; use await_until")
        if value:
            return value
        _expired(deadline, timeout, what)
        time.sleep(every)


async def await_until(pred: Callable[[], T | Awaitable[T]], timeout: float | None = 10.0,
                      what: str = "condition", every: float = 0.1) -> T:
    """``wait_until`` for the event loop; ``pred`` may be plain or async."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        value = pred()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        _expired(deadline, timeout, what)
        await asyncio.sleep(every)
