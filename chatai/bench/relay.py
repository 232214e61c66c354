"""The relay ceiling: how many tokens per second and concurrent streams one gateway process (or
N replicas, ``--replicas``) carries.

The worker runs the synthetic token source (``gpu_worker/synthetic.py``, a load-test tool), so
no model limits the rate: whatever saturates first is the path itself. While the streams run,
the gateway's resident memory and CPU time are sampled from ``/proc``: its process and its
children (the replicas of ``chatai gateway --replicas``), summed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from broker_config.timing import run_periodically

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
log = logging.getLogger("chatai.bench.relay")


@dataclass
class ProcSample:
    rss_mb: float
    cpu_s: float


def sample_process(pid: int) -> ProcSample:
    """One process's resident memory and CPU time, from /proc."""
    rss_kb = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss_kb = int(line.split()[1])
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime
    return ProcSample(rss_kb / 1024, cpu)


def sample(pid: int) -> ProcSample:
    """The process and its live descendants, summed (one gateway, or its replicas)."""
    total = sample_process(pid)
    for child in psutil.Process(pid).children(recursive=True):
        try:
            part = sample_process(child.pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # it ended meanwhile
        total = ProcSample(total.rss_mb + part.rss_mb, total.cpu_s + part.cpu_s)
    return total


async def relay_level(load: Callable[[], Awaitable[dict]], gateway_pid: int, worker_pids: tuple[int, ...] = ()) -> dict:
    """Run ``load`` (one level of vLLM's benchmark client: every stream at once, one request
    each); the gateway watched every 0.2 s meanwhile. Its row, with the gateway's figures."""
    before = sample(gateway_pid)
    workers_before = sum(sample(pid).cpu_s for pid in worker_pids)
    peak = before.rss_mb
    stop = asyncio.Event()

    def watch() -> None:
        nonlocal peak
        peak = max(peak, sample(gateway_pid).rss_mb)

    watcher = asyncio.create_task(run_periodically(watch, 0.2, what="memory sample", logger=log, stop=stop))
    t0 = time.perf_counter()
    try:
        row = await load()
    finally:
        stop.set()
        await watcher
    # CPU over the client's own measured span: its start-up (importing vLLM) finds the path idle.
    wall = row.get("wall_s") or time.perf_counter() - t0
    after = sample(gateway_pid)
    row.update(gateway_rss_before_mb=round(before.rss_mb, 1), gateway_rss_peak_mb=round(peak, 1),
               gateway_cpu_percent=round(100 * (after.cpu_s - before.cpu_s) / wall, 1))
    if worker_pids:  # which side saturated first: the relay or the token sources (summed)
        workers_after = sum(sample(pid).cpu_s for pid in worker_pids)
        row["worker_cpu_percent"] = round(100 * (workers_after - workers_before) / wall, 1)
    return row
