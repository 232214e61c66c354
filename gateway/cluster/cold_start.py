"""A model's readiness, and how long a request for it may wait for a worker to start.

Scale to zero must not fail the first users: a model with no worker is still one of the
deployment's models. What the gateway knows, all from the workers exchange (no broker admin
rights needed): live workers' heartbeats (``starting`` while they load, ``ready``), and the
heartbeat of every running ``chatai autoscale`` (the models it starts workers for on demand,
its tasks on their way, the last measured start-up). From that, per model:

- ``ready``: a ready worker. A request waits the ordinary queue timeout (the workers are busy
  if it runs out).
- ``starting``: a worker loads, or an autoscaler has a task on its way. A request waits up to
  the model's cold-start timeout.
- ``cold``: neither. If an autoscaler runs for the model, the waiting request is the backlog that
  makes it start a worker: wait up to the cold-start timeout. If nothing will start one, say so
  at once (``ModelNotLoaded``: 503, retry-after) rather than keep the client for nothing.

Silence right after (re)connecting proves nothing yet, so that last verdict waits until every
worker and autoscaler has had time to be heard; and an unknown model keeps its 404 (a passive
declare finds no queue for it, and the publish then says so).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from broker_config.connection import QueueDepth
from gateway.cluster.errors import ModelNotLoaded
from gateway.cluster.registry import WorkerRegistry

State = Literal["ready", "starting", "cold"]


@dataclass(frozen=True)
class ModelView:
    """One model as clients see it (``/v1/models``' extension fields, the status page)."""

    model: str
    state: State
    on_demand: bool  # a running autoscaler starts a worker when a request waits
    startup_seconds: float | None  # the last measured start-up of one of its workers

    def fields(self) -> dict[str, object]:
        seconds = None if self.startup_seconds is None else round(self.startup_seconds, 1)
        return {"state": self.state, "on_demand": self.on_demand, "startup_seconds": seconds}


def view(registry: WorkerRegistry, model: str) -> ModelView:
    workers = registry.models().get(model, [])
    scaled = registry.scaled().get(model)
    if any(h.state == "ready" for h in workers):
        state: State = "ready"
    elif any(h.state == "starting" for h in workers) or (
            # tasks on their way: pending ones, and running ones not heard from yet (importing)
            scaled is not None and (scaled.pending > 0 or scaled.running > len(workers))):
        state = "starting"
    else:
        state = "cold"
    return ModelView(model, state, scaled is not None, registry.startup_seconds(model))


def listed_models(registry: WorkerRegistry, configured: list[str]) -> list[str]:
    """The deployment's models: those of live workers, of running autoscalers, and configured."""
    return sorted(set(registry.models()) | set(registry.scaled()) | set(configured))


@dataclass(frozen=True)
class StartPlan:
    """How long a request may wait for a worker to start it, and why."""

    wait: float
    cold: bool  # no ready worker: a worker has to start first
    view: ModelView


def _will_start(v: ModelView) -> bool:
    """A worker serves the model, loads, or an autoscaler will start one."""
    return v.state != "cold" or v.on_demand


class QueueProbe(Protocol):
    @property
    def connected(self) -> bool: ...

    @property
    def blocked(self) -> bool: ...

    async def queue_depth(self, model: str) -> QueueDepth | None: ...


async def plan_start(registry: WorkerRegistry, broker: QueueProbe, model: str, queue_timeout: float,
                     cold_start_timeout: float) -> StartPlan:
    """The wait for a request to ``model`` (its queue's name); ModelNotLoaded when nothing will
    start a worker for it."""
    v = view(registry, model)
    if v.state == "ready":
        return StartPlan(queue_timeout, False, v)
    if v.state == "starting" or v.on_demand:
        return StartPlan(cold_start_timeout, True, v)
    if not broker.connected:  # nothing can be known: the publish answers 503 service_paused
        return StartPlan(queue_timeout, False, v)
    # A resource alarm: the broker reads nothing more from this connection (a passive declare
    # would wait for ever) and the workers' heartbeats stop, so a ready model looks cold. The
    # publish answers 503 cluster_overloaded at once.
    if broker.blocked:
        return StartPlan(queue_timeout, False, v)
    await registry.heard_everyone(lambda: _will_start(view(registry, model)))
    v = view(registry, model)
    if _will_start(v):
        return await plan_start(registry, broker, model, queue_timeout, cold_start_timeout)
    depth = await broker.queue_depth(model)
    if depth is None:  # no such queue (the publish answers 404), or the broker just went away
        return StartPlan(queue_timeout, False, v)
    if depth.consumers:  # a consumer that sends no heartbeats (an old worker): as before
        return StartPlan(queue_timeout, False, v)
    raise ModelNotLoaded(model)
