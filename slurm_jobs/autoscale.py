"""Queue-depth autoscaling: a pure decision function and the daemon loop that feeds it.

Why this split: the policy (how many array tasks to submit or let go of, given what the broker
and Slurm show) is where the subtle cases live - a worker that runs but has not loaded its
model yet, tasks still pending, a cooldown - so it is a pure function of an observation, tested
without Slurm or RabbitMQ. The loop only gathers observations and carries out decisions.

Scaling down is deliberately not the autoscaler's job: it never signals a running worker to
scale down. Each worker exits by itself after its ``--idle-timeout`` without work, which is also
the moment its GPU is least valuable to us and most valuable to the cluster; that is how a model
reaches zero. The autoscaler only cancels *pending* tasks nobody needs any more (they hold
nothing). The one exception is giving way (``--yield-to-pending``, ``slurm_jobs/yielding.py``):
when regular jobs wait for GPUs workers hold, it tells that many workers to drain at once
rather than leave it to Slurm's preemption, which measured far from prompt, and it tells again
a worker that was told to go but did not hear it.

Each round ends with the autoscaler's own heartbeat (``slurm_jobs/announce.py``): gateways learn
from it that a model scaled to zero comes back on demand, so its requests wait for the start
instead of failing, and that wait is the backlog that makes the next round submit a worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field

from broker_config.messages import Heartbeat, ScaledModel
from broker_config.timing import run_periodically
from slurm_jobs.announce import Announcer, StartupTimes
from slurm_jobs.broker_view import BrokerView
from slurm_jobs.capacity import NodeRoom
from slurm_jobs.jobs import WorkerJobs
from slurm_jobs.slurm import SlurmError
from slurm_jobs.yielding import Departures, QueuedJob, choose_yields

log = logging.getLogger("chatai.autoscale")

ROUND_INTERVAL = 5.0  # seconds between two rounds over all models
# Seconds between two looks for regular jobs waiting on workers' GPUs (--yield-to-pending). A worker
# gone before Slurm's next scheduling pass costs the job nothing; one gone after it costs a pass
# (docs/coexistence.md), so the look runs on its own clock, a fraction of the pass interval. Each
# look is one ``scontrol show job`` (5 ms with 40 jobs here; more on a big site's queue).
YIELD_INTERVAL = 1.0


@dataclass(frozen=True)
class Policy:
    """Bounds and pace for one model."""

    min_workers: int = 0
    max_workers: int = 2
    backlog_per_worker: int = 8  # waiting requests one more worker is expected to absorb
    cooldown: float = 60.0  # seconds between two submissions for the same model
    release_pending_after: float = 120.0  # an empty queue for this long lets pending tasks go


@dataclass(frozen=True)
class Observation:
    """One model at one instant, as the broker and Slurm report it."""

    model: str
    now: float
    ready: int  # requests waiting in the model queue (not yet pulled by any worker)
    consumers: int  # workers pulling from the queue
    pending: int  # array tasks Slurm has not started
    running: int  # array tasks running (loading their model, serving or draining)
    draining: int = 0  # running workers that announced they are leaving (heartbeat state)
    last_submit_at: float | None = None
    queue_empty_since: float | None = None  # when the queue was last seen non-empty -> empty
    queue_exists: bool = True  # the broker has a queue for the model


@dataclass(frozen=True)
class Decision:
    submit: int = 0  # new array tasks to submit
    cancel_pending: int = 0  # pending tasks to cancel
    reason: str = "steady"


def decide(obs: Observation, policy: Policy) -> Decision:
    """How many tasks to submit (or pending ones to cancel) for this model, and why.

    - Workers that will serve soon count as capacity: pending tasks, and running tasks that do
      not consume yet (the engine takes a while to load). Draining workers do not count.
    - Below ``min_workers``: submit up to the floor at once (no cooldown: a floor is a promise).
    - Requests waiting: the queue is only non-empty when every consumer is full, so each
      ``backlog_per_worker`` waiting requests call for one more worker, up to ``max_workers``,
      at most once per cooldown.
    - Queue empty for a while: pending tasks above the floor are cancelled; running workers
      are never touched (they go away by themselves when idle).
    """
    if policy.min_workers < 0 or policy.max_workers < policy.min_workers:
        raise ValueError("need 0 <= min_workers <= max_workers")
    live = max(0, obs.running - obs.draining)
    active = live + obs.pending
    if active < policy.min_workers:
        n = min(policy.min_workers, policy.max_workers) - active
        return Decision(submit=n, reason=f"below the floor of {policy.min_workers} worker(s)")
    if obs.ready > 0:
        coming = obs.pending + max(0, live - obs.consumers)  # not pulling yet, but will
        wanted = math.ceil(obs.ready / max(1, policy.backlog_per_worker)) - coming
        room = policy.max_workers - active
        if wanted <= 0:
            return Decision(reason=f"{obs.ready} waiting; {coming} worker(s) on their way")
        if room <= 0:
            return Decision(reason=f"{obs.ready} waiting; at the ceiling of {policy.max_workers}")
        if obs.last_submit_at is not None and obs.now - obs.last_submit_at < policy.cooldown:
            return Decision(reason="cooling down")
        n = min(wanted, room)
        return Decision(submit=n, reason=f"{obs.ready} waiting, {obs.consumers} consumer(s)")
    if obs.pending > 0 and active > policy.min_workers and obs.queue_empty_since is not None \
            and obs.now - obs.queue_empty_since >= policy.release_pending_after:
        n = min(obs.pending, active - policy.min_workers)
        return Decision(cancel_pending=n, reason="queue empty: pending tasks not needed")
    return Decision()


@dataclass
class _ModelState:
    last_submit_at: float | None = None
    queue_empty_since: float | None = None


@dataclass
class Autoscaler:
    """The daemon: every ``interval`` seconds, observe each model, decide, act."""

    jobs: WorkerJobs
    view: BrokerView
    policies: dict[str, Policy]  # served model name -> policy
    model_paths: dict[str, str] = field(default_factory=dict)
    interval: float = ROUND_INTERVAL
    state: dict[str, _ModelState] = field(default_factory=dict)
    announcer: Announcer | None = None  # tells gateways which cold models are worth a wait
    startup: StartupTimes = field(default_factory=StartupTimes)
    yield_to_pending: bool = False  # drain workers for regular jobs waiting on their GPUs
    yield_interval: float = YIELD_INTERVAL
    departures: Departures = field(default_factory=Departures)  # workers told to go, until gone
    _signalling: set[str] = field(default_factory=set)  # SIGTERMs still on their way (see _tell)
    _unfit_said: set[tuple[str, str, int]] = field(default_factory=set)  # (job, reason, nodes) logged once

    async def observe(self, model: str, jobs_by_model: dict, heartbeats: list[Heartbeat], now: float) -> Observation:
        stats = await self.view.queue_stats(model)
        st = self.state.setdefault(model, _ModelState())
        ready = stats.ready or 0
        if ready > 0:
            st.queue_empty_since = None
        elif st.queue_empty_since is None:
            st.queue_empty_since = now
        jobs = jobs_by_model.get(model, [])
        return Observation(
            model=model, now=now, ready=ready, consumers=stats.consumers or 0,
            pending=sum(1 for j in jobs if j.pending), running=sum(1 for j in jobs if j.running),
            draining=sum(1 for hb in heartbeats if hb.model == model and hb.state == "draining"),
            last_submit_at=st.last_submit_at, queue_empty_since=st.queue_empty_since,
            queue_exists=stats.ready is not None,
        )

    async def step(self) -> dict[str, Decision]:
        """One round over all models; returns what was decided (for logs and tests)."""
        now = time.time()
        by_model = await asyncio.to_thread(self.jobs.jobs_by_model)
        heartbeats = self.view.book.live()
        self.startup.learn(heartbeats)
        decisions = {}
        announced = []
        for model, policy in self.policies.items():
            obs = await self.observe(model, by_model, heartbeats, now)
            d = decide(obs, policy)
            decisions[model] = d
            if obs.queue_exists:  # a model without a queue cannot be asked for: nothing to promise
                announced.append(ScaledModel(model=model, max_workers=policy.max_workers,
                                             pending=obs.pending + d.submit - d.cancel_pending, running=obs.running,
                                             startup_seconds=self.startup.seconds.get(model)))
            if d.submit:
                job_id = await asyncio.to_thread(self.jobs.submit, model, d.submit, self.model_paths.get(model))
                self.state[model].last_submit_at = now
                log.info("%s: submitted %d task(s) as job %s (%s)", model, d.submit, job_id, d.reason)
            elif d.cancel_pending:
                ids = await asyncio.to_thread(self.jobs.cancel_pending, model, d.cancel_pending)
                log.info("%s: cancelled pending %s (%s)", model, ",".join(ids), d.reason)
            else:
                log.debug("%s: %s (ready=%d consumers=%d pending=%d running=%d)", model, d.reason,
                          obs.ready, obs.consumers, obs.pending, obs.running)
        if self.announcer is not None:
            await self.announcer.announce(announced)
        return decisions

    async def give_way_round(self) -> None:
        await asyncio.to_thread(self.give_way, self.view.book.live())

    def give_way(self, heartbeats: list[Heartbeat], now: float | None = None) -> list[str]:
        """Tell the workers on GPUs that waiting regular jobs need to drain, all in this round,
        and again those told before that have not heard; returns who was told."""
        now = time.monotonic() if now is None else now
        slurm = self.jobs.slurm
        jobs = [QueuedJob.from_scontrol(f) for f in slurm.show_jobs()]
        self.departures.observe(jobs, now)
        pending = {j.job_id for j in jobs if j.state == "PENDING"}
        self._unfit_said = {k for k in self._unfit_said if k[0] in pending}  # forget jobs gone: it runs for months
        states = {hb.slurm_job_id: hb.state for hb in heartbeats if hb.slurm_job_id}
        again = [t for t in self.departures.unheard(states, now) if t not in self._signalling]
        new: list[str] = []
        if any(j.waits_for_gpus(self.jobs.settings.partition) for j in jobs):
            nodes = [NodeRoom.from_scontrol(f) for f in slurm.show_nodes()]
            busy = {hb.slurm_job_id: hb.in_flight for hb in heartbeats if hb.slurm_job_id}
            new = choose_yields(jobs, nodes, self.jobs.settings.partition, busy, self.departures, self._left_to_slurm)
        if not (new or again):
            return []
        self.departures.told(new + again, now)
        self._tell(new + again)
        if new:
            log.info("giving way to waiting regular jobs: told %s to drain", ",".join(new))
        if again:
            log.warning("told %s to drain again: no sign it heard the first time", ",".join(again))
        return new + again

    def _left_to_slurm(self, job: QueuedJob, nodes_found: int) -> None:
        """Say once why a waiting regular job gets no worker's GPU: it also waits for regular jobs."""
        key = (job.job_id, job.reason, nodes_found)
        if key not in self._unfit_said:
            self._unfit_said.add(key)
            log.info("giving way: regular job %s (%d node(s) x %d GPU, Reason=%s) is left to Slurm: free GPUs "
                     "and workers cover %d of its nodes", job.job_id, job.nodes, job.gpus_per_node, job.reason,
                     nodes_found)

    @property
    def signalling(self) -> frozenset[str]:
        """Workers whose SIGTERM is still on its way."""
        return frozenset(self._signalling)

    def _tell(self, task_ids: list[str]) -> None:
        """SIGTERM each worker in its own ``scancel``, in the background. Why: Slurm refuses to
        signal a job whose batch step is still being launched ("Job can not be altered now, try
        again later") and scancel then retries for seconds; with all the ids in one call, that
        held back the signals of the others and this whole round (measured: 5 s)."""
        batch_only = self.jobs.settings.cancel_mode == "batch"

        def tell(task_id: str) -> None:
            try:
                self.jobs.slurm.signal([task_id], "TERM", batch_only=batch_only)
            except SlurmError as exc:  # it ended meanwhile, or slurmctld never took the signal
                log.warning("giving way: %s", exc)
            finally:
                self._signalling.discard(task_id)

        for task_id in task_ids:
            self._signalling.add(task_id)
            threading.Thread(target=tell, args=(task_id,), name=f"give-way-{task_id}", daemon=True).start()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Round after round until ``stop``, and with ``yield_to_pending`` the looks for waiting
        regular jobs on their own clock; a failed round (slurmctld busy, broker restarting) is
        logged and the next one tries again."""
        stop = stop or asyncio.Event()
        loops = [run_periodically(self.step, self.interval, what="autoscaler round", logger=log, stop=stop)]
        if self.yield_to_pending:
            loops.append(run_periodically(self.give_way_round, self.yield_interval, what="giving way", logger=log,
                                          stop=stop))
        await asyncio.gather(*loops)
