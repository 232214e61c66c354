"""Scale to zero without failing users, in memory: a model's state from heartbeats (workers' and
autoscalers'), the wait a request gets, the at-once 503 when nothing will start a worker, and
the keep-alive body of a streamed request committed before its worker started.

End to end (a real autoscaler on a private Slurm, the SDK and the chat page): tests/test_slurm.py.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from broker_config.connection import QueueDepth
from broker_config.messages import Data, Final, Head, Heartbeat, ScaledModel, ScalerHeartbeat, Started
from gateway.cluster import registry as registry_module
from gateway.cluster.cold_start import listed_models, plan_start, view
from gateway.cluster.errors import ModelNotLoaded, NoWorkerAvailable
from gateway.cluster.registry import WorkerRegistry
from gateway.errors import to_api_error
from gateway.streaming import waiting_relay
from slurm_jobs.announce import StartupTimes

QUEUE, COLD = 30.0, 540.0


def worker(state: str, model: str = "tiny", startup: float | None = None, adapters=()) -> Heartbeat:
    return Heartbeat(worker_id=f"w-{state}", model=model, state=state, capacity=4, in_flight=0, node="n",
                     sent_at=time.time(), interval=5.0, startup_seconds=startup, adapters=list(adapters))


def scaler(*models: ScaledModel, interval: float = 5.0) -> ScalerHeartbeat:
    return ScalerHeartbeat(scaler_id="s1", models=list(models), interval=interval, sent_at=time.time())


class Queues:
    """The passive declare: the queues the broker has, with their consumers."""

    def __init__(self, **consumers: int) -> None:
        self.consumers = consumers
        self.connected = True
        self.blocked = False

    async def queue_depth(self, model: str) -> QueueDepth | None:
        n = self.consumers.get(model)
        return None if n is None else QueueDepth(messages=0, consumers=n)


def heard(reg: WorkerRegistry) -> WorkerRegistry:
    """A registry that has listened long enough for silence to mean something."""
    reg.listening()
    reg._listening_since -= registry_module.HEAR_EVERYONE_WITHIN
    return reg


async def test_a_ready_model_waits_the_queue_timeout_a_starting_one_the_cold_start_timeout():
    reg = heard(WorkerRegistry())
    reg.update(worker("ready", startup=42.0))
    plan = await plan_start(reg, Queues(tiny=1), "tiny", QUEUE, COLD)
    assert (plan.wait, plan.cold, plan.view.state, plan.view.startup_seconds) == (QUEUE, False, "ready", 42.0)
    reg.update(worker("stopped").model_copy(update={"worker_id": "w-ready"}))  # the worker left: scaled to zero
    reg.update(worker("starting"))  # another one loads
    plan = await plan_start(reg, Queues(tiny=0), "tiny", QUEUE, COLD)
    assert (plan.wait, plan.cold, plan.view.state) == (COLD, True, "starting")
    assert plan.view.startup_seconds == 42.0  # remembered after the worker left: "about 42 s"


async def test_a_cold_model_with_an_autoscaler_waits_for_the_start_it_will_bring():
    reg = heard(WorkerRegistry())
    reg.update_scaler(scaler(ScaledModel(model="tiny", max_workers=2, startup_seconds=55.0)))
    plan = await plan_start(reg, Queues(tiny=0), "tiny", QUEUE, COLD)
    assert (plan.wait, plan.cold) == (COLD, True)
    assert view(reg, "tiny").fields() == {"state": "cold", "on_demand": True, "startup_seconds": 55.0}
    # a task on its way (pending, or running but not heard from yet) makes it "starting"
    reg.update_scaler(scaler(ScaledModel(model="tiny", max_workers=2, pending=1)))
    assert view(reg, "tiny").state == "starting"
    reg.update_scaler(scaler(ScaledModel(model="tiny", max_workers=2, running=1)))
    assert view(reg, "tiny").state == "starting"
    reg.update(worker("ready"))
    assert view(reg, "tiny").state == "ready"


async def test_right_after_connecting_a_request_waits_for_its_models_worker_not_for_everyone():
    """Silence just after (re)connecting proves nothing, so a request for a model nobody has
    announced yet waits; but the heartbeat of a ready worker of that model ends its wait at
    once, not at the end of the window (a clean run saw streams wait the whole 11 s after a
    gateway's start while their worker was ready)."""
    reg = WorkerRegistry()
    reg.listening()
    waiting = asyncio.create_task(plan_start(reg, Queues(tiny=1), "tiny", QUEUE, COLD))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # nothing heard yet: no verdict
    reg.update(worker("ready", model="other"))  # another model's worker: not enough
    await asyncio.sleep(0.05)
    assert not waiting.done()
    reg.update(worker("ready"))
    # A hang guard, not a speed target: the window is 11 s, the wake-up takes microseconds.
    plan = await asyncio.wait_for(waiting, registry_module.HEAR_EVERYONE_WITHIN / 2)
    assert (plan.wait, plan.cold, plan.view.state) == (QUEUE, False, "ready")


async def test_nothing_will_start_a_worker_is_said_at_once_with_retry_after():
    reg = heard(WorkerRegistry())
    began = time.monotonic()
    with pytest.raises(ModelNotLoaded) as caught:
        await plan_start(reg, Queues(tiny=0), "tiny", QUEUE, COLD)
    assert time.monotonic() - began < QUEUE  # no wait for a worker that nothing starts
    api = to_api_error(caught.value)
    assert (api.status, api.code) == (503, "model_not_loaded")
    assert api.headers == {"retry-after": "60", "x-should-retry": "false"}
    assert "no autoscaler is running" in api.message and "'tiny'" in api.message
    # An unknown model (no queue) is not "not loaded": the publish answers 404 as before.
    plan = await plan_start(reg, Queues(), "nope", QUEUE, COLD)
    assert (plan.wait, plan.cold) == (QUEUE, False)
    # Without a broker nothing is known: no verdict, the publish answers 503 service_paused.
    away = Queues(tiny=0)
    away.connected = False
    assert (await plan_start(WorkerRegistry(), away, "tiny", QUEUE, COLD)).wait == QUEUE


async def test_a_blocked_broker_is_not_asked_for_its_queues():
    """During a resource alarm the broker reads nothing from the gateway's connection and the
    workers' heartbeats stop: the plan must neither call the model cold nor probe its queue
    (the probe would wait for ever); the publish then answers 503 cluster_overloaded."""
    class Blocked(Queues):
        async def queue_depth(self, model: str) -> QueueDepth | None:
            raise AssertionError("a blocked connection was probed")

    blocked = Blocked(tiny=0)
    blocked.blocked = True
    plan = await plan_start(heard(WorkerRegistry()), blocked, "tiny", QUEUE, COLD)
    assert (plan.wait, plan.cold) == (QUEUE, False)


async def test_an_autoscaler_that_stopped_promises_nothing_any_more():
    reg = heard(WorkerRegistry(expiry_intervals=3.0))
    reg.update_scaler(scaler(ScaledModel(model="tiny", max_workers=2), interval=0.02))
    assert view(reg, "tiny").on_demand
    await asyncio.sleep(0.1)  # three intervals without a round
    assert not view(reg, "tiny").on_demand
    with pytest.raises(ModelNotLoaded):
        await plan_start(reg, Queues(tiny=0), "tiny", QUEUE, COLD)


async def test_silence_right_after_connecting_is_not_taken_for_a_cold_model(monkeypatch):
    """A gateway that has just (re)connected has heard nobody yet: it listens before it says 503."""
    monkeypatch.setattr(registry_module, "HEAR_EVERYONE_WITHIN", 0.3)
    reg = WorkerRegistry()
    reg.listening()
    plan = asyncio.ensure_future(plan_start(reg, Queues(tiny=0), "tiny", QUEUE, COLD))
    await asyncio.sleep(0.05)
    reg.update_scaler(scaler(ScaledModel(model="tiny", max_workers=1)))  # heard within the window
    assert (await plan).cold


def test_the_list_holds_live_autoscaled_and_configured_models_and_adapters_route_while_cold():
    reg = WorkerRegistry()
    reg.update(worker("ready", model="a", adapters=["a-lora"]))
    reg.update_scaler(scaler(ScaledModel(model="b", max_workers=1)))
    assert listed_models(reg, ["c"]) == ["a", "b", "c"]
    assert view(reg, "c").fields() == {"state": "cold", "on_demand": False, "startup_seconds": None}
    reg.update(worker("stopped", model="a").model_copy(update={"worker_id": "w-ready"}))
    assert reg.queue_for("a-lora") == "a"  # its base model's queue, where the wait wakes a worker


def test_the_autoscaler_learns_start_up_times_from_ready_workers():
    times = StartupTimes()
    times.learn([worker("starting"), worker("ready", startup=61.5)])
    assert times.seconds == {"tiny": 61.5}


def test_no_worker_in_time_says_whether_it_was_a_cold_start():
    warm, cold = to_api_error(NoWorkerAvailable("tiny", 30)), to_api_error(NoWorkerAvailable("tiny", 540, True))
    assert warm.status == cold.status == 503 and warm.code == cold.code == "no_worker_available"
    assert warm.headers == {"retry-after": "10"}  # busy workers: the SDK's retries are worth it
    assert cold.headers == {"retry-after": "60", "x-should-retry": "false"}  # a retry would wait as long again
    assert "cold-start timeout of 540 s" in cold.message


async def _frames(*frames):
    for f in frames:
        await asyncio.sleep(0)
        yield f


async def _decisive(frames, delay: float):
    await asyncio.sleep(delay)
    while True:
        frame = await frames.__anext__()
        if isinstance(frame, (Head, Final)):
            return frame


async def test_a_committed_stream_sends_comments_until_the_worker_starts_then_the_answer():
    rid = "r1"
    frames = _frames(Started(request_id=rid, worker_id="w"), Head(request_id=rid, seq=1),
                     Data(request_id=rid, seq=2, data='data: {"x":1}\n\n'), Final(request_id=rid, seq=3))
    body = [chunk async for chunk in waiting_relay(asyncio.ensure_future(_decisive(frames, 0.25)), frames,
                                                   "tiny", 55.0, every=0.1)]
    comments = [c for c in body if c.startswith(b":")]
    assert len(comments) >= 2 and comments[0].startswith(b": starting a worker for tiny (about 55 s)")
    assert body[len(comments):] == [b'data: {"x":1}\n\n']  # then the worker's events, unchanged


async def test_a_committed_stream_ends_with_an_error_event_when_no_worker_came_or_vllm_refused():
    async def no_worker():
        raise NoWorkerAvailable("tiny", 540, True)

    frames = _frames()
    body = [c async for c in waiting_relay(asyncio.ensure_future(no_worker()), frames, "tiny", None, every=0.1)]
    event = json.loads(body[-1].removeprefix(b"data: "))
    assert event["error"]["code"] == "no_worker_available"
    assert b"start-up time not known yet" in body[0]

    refusal = '{"error": {"message": "bad", "type": "BadRequestError", "code": 400}}'
    frames = _frames(Started(request_id="r", worker_id="w"), Final(request_id="r", seq=1, status=400, body=refusal))
    body = [c async for c in waiting_relay(asyncio.ensure_future(_decisive(frames, 0.0)), frames, "tiny", 5.0, 0.1)]
    assert json.loads(body[-1].removeprefix(b"data: "))["error"]["message"] == "bad"
