"""The worker's run loop: connect, start the engine, serve, and leave gracefully.

Order matters. The worker says "starting" before loading the model (minutes for big ones; told to stop
meanwhile, it leaves at once without waiting for the load), owns
its control queue before taking any request (so no cancel is missed), and on the way out stops
consuming first, finishes or returns what it holds, and only then says "stopped" and exits 0:
for Slurm and the autoscaler a drained worker is a normal end, not a failure.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import NoReturn

from broker_config import topology
from broker_config.connection import connect, redact
from broker_config.timing import first_of
from gpu_worker import slurm
from gpu_worker.consumer import Consumer
from gpu_worker.engine import ApiEngine, Engine
from gpu_worker.heartbeat import Heartbeater
from gpu_worker.lifecycle import StopSignal, exit_now, leave_now, watch_idle, watch_job_end
from gpu_worker.replies import ReplyPublisher
from gpu_worker.settings import WorkerSettings

log = logging.getLogger("chatai.worker")

READY_LINE = "worker ready"  # tests and scripts wait for this in the log


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aio_pika").setLevel(logging.WARNING)
    logging.getLogger("aiormq").setLevel(logging.WARNING)


async def _drain(consumer: Consumer, stop: StopSignal, grace: float, returns_whole: bool) -> None:
    """Finish held work within the grace (a second signal cuts it short), requeue the rest.
    With ``returns_whole`` the non-streamed answers go back at once and only streams are waited for."""
    deadline = time.monotonic() + grace
    if returns_whole and (n := await consumer.return_remaining(whole_only=True)):
        log.info("drain: gave %d whole answer(s) back to the queue at once", n)
    signals = stop.signals
    while consumer.in_flight and time.monotonic() < deadline and stop.signals == signals:
        await consumer.wait_idle(min(0.5, max(0.0, deadline - time.monotonic())))
    if consumer.in_flight:
        n = await consumer.return_remaining()
        log.info("drain: returned %d request(s) to the queue", n)


async def run(settings: WorkerSettings) -> int:
    """Serve until told to stop; returns the process exit code."""
    t0 = time.monotonic()
    stop = StopSignal()
    stop.install()
    fatal: list[BaseException] = []
    url = settings.broker_url.get_secret_value()
    model = settings.served_model_name or ""
    log.info("worker_id=%s model=%s capacity=%s broker=%s", settings.worker_id, model,
             settings.max_num_seqs or "engine default", redact(url))

    conn = await connect(url, name=f"chatai-worker {settings.worker_id}")
    consumer: Consumer | None = None
    engine: ApiEngine | None = None
    hb: Heartbeater | None = None
    try:
        beat_channel = await conn.channel()
        workers_exchange = await beat_channel.get_exchange(topology.WORKERS_EXCHANGE, ensure=False)
        hb = Heartbeater(
            workers_exchange,
            worker_id=settings.worker_id,
            model=model,
            capacity=settings.max_num_seqs or 0,  # known once the engine has started
            interval=settings.heartbeat_interval,
            in_flight=lambda: consumer.in_flight if consumer else 0,
            slurm_job_id=slurm.job_id(),
            max_model_len=settings.max_model_len,
        )
        await hb.send()
        hb.start()

        # The engine loads in a thread so heartbeats and AMQP keep flowing meanwhile.
        engine_cls: type = Engine
        if settings.engine == "synthetic":  # a load-test tool: filler tokens, no model
            from gpu_worker.synthetic import SyntheticEngine as engine_cls

            log.warning("engine=synthetic: serving filler tokens for load tests, not a model")
        engine_task = asyncio.ensure_future(asyncio.to_thread(engine_cls.start, settings))
        if engine_task not in await first_of(engine_task, stop.event.wait()):
            # Told to go while the engine loads (Slurm preempting a worker placed in a gap shorter
            # than its start-up): it holds no request, and waiting for a load of seconds to
            # minutes would keep the GPU from the job Slurm is giving it to. (The load's thread
            # cannot be cancelled: leave_now ends the processes it has started.)
            log.info("stopping (%s) while the engine loads: leaving without it", stop.reason)
            await hb.send_stopped()
            await conn.close()
            leave_now(0)
        engine = engine_task.result()
        await engine.open_api()
        hb.max_model_len = engine.max_model_len
        hb.capacity = engine.max_num_seqs
        hb.adapters, hb.tasks = engine.adapters, engine.tasks
        hb.prefix_cache = engine.prefix_cache
        log.info("engine started in %.1fs, max_model_len=%d", time.monotonic() - t0, engine.max_model_len)
        freeze_heap()

        if not stop.event.is_set():
            # One channel for the replies and both subscriptions (control first). After a lost
            # connection aio-pika restores a channel's queues in the order they were declared, but
            # channels in no particular order: on separate channels a redelivered request could
            # reach this worker before its new control queue was bound (its cancel was lost), or
            # before the reply channel was back (its "started", sent the moment it is taken, was
            # lost, and the gateway waited for it in vain).
            work_channel = await conn.channel(publisher_confirms=True)
            replies = await work_channel.get_exchange(topology.REPLIES_EXCHANGE, ensure=False)
            consumer = Consumer(
                settings, engine, ReplyPublisher(replies),
                on_change=hb.in_flight_changed,
                on_fatal=lambda exc: (fatal.append(exc), stop.set("engine died")),
            )
            await consumer.start_control(work_channel)
            await consumer.start(work_channel)
            hb.affinity = settings.affinity
            hb.startup_seconds = round(since_process_start(), 1)  # what a cold model's first user waits
            await hb.set_state("ready")
            log.info("%s: worker_id=%s model=%s capacity=%d startup=%.1fs (%.1fs since the process started)",
                     READY_LINE, settings.worker_id, model, engine.max_num_seqs, time.monotonic() - t0,
                     hb.startup_seconds)

            watchers = [
                asyncio.create_task(watch_idle(stop, settings.idle_timeout, lambda: consumer.in_flight,
                                               lambda: consumer.last_activity)),
                asyncio.create_task(watch_job_end(stop, settings.drain_grace + settings.job_end_margin,
                                                  settings.job_end_poll, _set_job_end(hb))),
            ]
            reason = await stop.wait()
            for w in watchers:
                w.cancel()
            await hb.set_state("draining")
            await consumer.stop_consuming()
            log.info("draining (%s): %d in flight, grace %.0fs", reason, consumer.in_flight, settings.drain_grace)
            await _drain(consumer, stop, settings.drain_grace, settings.drain_returns_whole)
        await hb.send_stopped()
        log.info("stopped: served %d request(s)", consumer.completed if consumer else 0)
    finally:
        if hb is not None and hb.state != "stopped":  # failed on the way: say so, do not linger
            try:
                await hb.send_stopped()
            except Exception:
                pass
        try:
            await conn.close()
        except Exception:  # closing a dead connection must not hide the real error
            pass
        if engine is not None:
            gc.unfreeze()  # start-up's heap was frozen (freeze_heap): let shutdown's collection reach it
            engine.shutdown()
    return 1 if fatal else 0


def since_process_start() -> float:
    """Seconds since this process started, imports included (vLLM's take seconds of a start)."""
    import psutil

    return max(0.0, time.time() - psutil.Process().create_time())


def freeze_heap() -> None:
    """Move everything start-up allocated (torch, transformers, vLLM: millions of objects) out of
    the garbage collector's reach, as vLLM's own server does: a full collection over that heap
    stalls the event loop for 50-300 ms, which streams feel as a frozen first token."""
    gc.collect()
    gc.freeze()


def event_loop_factory():
    """uvloop where it is installed (it comes with ``uvicorn[standard]``): cheaper socket writes
    and callbacks on the per-token path; asyncio's own loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with the gateway's dependencies
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def _set_job_end(hb: Heartbeater):
    def set_end(end: float | None) -> None:
        hb.job_end_at = end
        hb.in_flight_changed()

    return set_end


def main(settings: WorkerSettings) -> NoReturn:
    """Run the worker; the process ends here, with ``run``'s exit code (``exit_now``)."""
    setup_logging()
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        code = runner.run(run(settings))
    exit_now(code)
