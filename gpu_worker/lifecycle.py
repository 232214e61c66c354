"""When to stop taking work: a signal, an idle spell, or the Slurm job nearing its end.

All three lead to the same graceful path in ``main``: stop consuming, finish what is held
within the drain grace, return the rest to the queue, say "stopped", exit 0. Slurm sends
SIGTERM on ``scancel``, on preemption and ahead of the time limit with ``--signal``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import NoReturn

import psutil

from broker_config.timing import run_periodically
from gpu_worker import slurm

log = logging.getLogger("chatai.worker.lifecycle")


class StopSignal:
    """One event for "time to go", with the reason that set it first."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.reason: str | None = None
        self.signals = 0

    def set(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            log.info("stopping: %s", reason)
        self.event.set()

    def install(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.signals += 1
        self.set(f"signal {signal.Signals(sig).name}")

    async def wait(self) -> str:
        await self.event.wait()
        return self.reason or "stop"


async def watch_idle(stop: StopSignal, idle_timeout: float, in_flight: Callable[[], int],
                     last_activity: Callable[[], float]) -> None:
    """Scale to zero: stop after idle_timeout seconds with nothing held and nothing received."""
    if idle_timeout <= 0:
        return

    def idle_for() -> float:
        return time.monotonic() - last_activity()

    def check() -> None:
        if in_flight() == 0 and (idle := idle_for()) >= idle_timeout:
            stop.set(f"idle for {idle:.0f}s")

    def next_check() -> float:  # at the moment the timeout would be reached, looked at every second
        return 1.0 if in_flight() else min(1.0, max(0.1, idle_timeout - idle_for()))

    await run_periodically(check, next_check, what="idle watch", logger=log, stop=stop.event)


async def watch_job_end(stop: StopSignal, keep: float, poll: float,
                        on_end_time: Callable[[float | None], None]) -> None:
    """Stop taking work when less than ``keep`` seconds (grace + margin) remain in the job."""
    job = slurm.job_id()
    if job is None:
        return
    end: float | None = None
    next_poll = 0.0

    async def check() -> None:
        nonlocal end, next_poll
        if (now := time.monotonic()) >= next_poll:
            new_end = await slurm.job_end_time()
            if new_end != end:
                end = new_end
                on_end_time(end)
                if end is not None:
                    log.info("slurm job %s ends in %.0fs", job, end - time.time())
            next_poll = now + poll
        if end is not None and end - time.time() <= keep:
            stop.set(f"slurm job ends in {max(0.0, end - time.time()):.0f}s")

    def next_check() -> float:  # every poll, and at the moment the job's end comes within keep
        return poll if end is None else min(poll, max(0.5, end - time.time() - keep))

    await run_periodically(check, next_check, what="job end watch", logger=log, stop=stop.event)


def engine_processes() -> list[psutil.Process]:
    """The processes this worker has started (the engine's), all but multiprocessing's resource
    tracker: it ignores SIGTERM and, once the worker is gone, frees any shared memory the others
    left behind, then exits by itself."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not any("resource_tracker" in part for part in child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            pass
    return found


def end_processes(procs: list[psutil.Process], grace: float) -> None:
    """SIGTERM, then SIGKILL whatever is still there after ``grace`` seconds."""
    left = procs
    for end in (psutil.Process.terminate, psutil.Process.kill):
        for proc in left:
            try:
                end(proc)
            except psutil.NoSuchProcess:
                pass
        _, left = psutil.wait_procs(left, timeout=grace)
        if not left:
            return


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown: after the engine is shut down and the broker
    connection closed there is nothing left to finish, and tearing down torch's and vLLM's
    modules takes seconds (3.5 s here) that a preempted worker's job would still hold its node."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def leave_now(code: int) -> NoReturn:
    """Exit at once, though a thread is still loading the engine (it cannot be interrupted, and
    the interpreter would wait for it at exit). The engine processes that load has spawned so far
    are ended first: they would outlive the worker as orphans holding the GPU and memory."""
    spawned = engine_processes()
    end_processes(spawned, grace=2.0)
    log.info("ended %d process(es) the engine load had started; exit %d", len(spawned), code)
    exit_now(code)
