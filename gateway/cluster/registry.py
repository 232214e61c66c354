"""Which workers are alive and which autoscalers run, from their heartbeats: the source of
``/v1/models``, of a cold model's wait (``gateway/cluster/cold_start.py``) and of the metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from broker_config.heartbeats import HeartbeatBook, ScalerBook
from broker_config.messages import Heartbeat, ScaledModel, ScalerHeartbeat
from broker_config.timing import pause
from gateway.metrics import know_model

# After (re)connecting, the gateway has heard nobody yet: it waits this long before it concludes
# from silence that no worker and no autoscaler exists (two default heartbeat intervals and a bit).
HEAR_EVERYONE_WITHIN = 11.0


class WorkerRegistry:
    """The gateway's heartbeat books (workers and autoscalers), plus what the API asks of them."""

    def __init__(self, expiry_intervals: float = 3.0) -> None:
        self._book = HeartbeatBook(expiry_intervals)
        # The last context each model was announced with: it still bounds requests that wait for a
        # worker while none is up (scaled to zero). A handful of ints per model, never forgotten.
        self._contexts: dict[str, int] = {}
        self._scalers = ScalerBook(expiry_intervals)
        self._startup: dict[str, float] = {}  # model -> the last measured worker start-up (s)
        self._adapter_bases: dict[str, str] = {}  # every LoRA adapter heard of -> its base model
        self._listening_since: float | None = None
        self._news = asyncio.Event()  # set by every heartbeat: a waiter may have heard what it needs

    def listening(self) -> None:
        """The heartbeat queue is (again) being consumed: silence means something from now on."""
        self._listening_since = time.monotonic()

    async def heard_everyone(self, enough: Callable[[], bool] = lambda: False) -> None:
        """Return once every live worker and autoscaler has had time to be heard since the
        heartbeat queue was (re)opened, or as soon as a heartbeat makes ``enough()`` hold (a
        request right after a gateway restart waits for its own model's worker, not for the whole
        window); at once if the queue never was opened (no broker: nothing to hear)."""
        while self._listening_since is not None and not enough():
            left = HEAR_EVERYONE_WITHIN - (time.monotonic() - self._listening_since)
            if left <= 0:
                return
            self._news.clear()
            await pause(left, self._news)

    def update(self, hb: Heartbeat) -> None:
        self._book.add(hb)
        self._news.set()
        if hb.startup_seconds is not None:
            self._startup[hb.model] = hb.startup_seconds
        for adapter in hb.adapters:
            self._adapter_bases[adapter] = hb.model
        if hb.state != "stopped":
            know_model(hb.model)
            if hb.max_model_len:
                self._contexts[hb.model] = self._live_context(hb.model) or hb.max_model_len
                for adapter in hb.adapters:
                    self._contexts[adapter] = self._contexts[hb.model]

    def _live_context(self, model: str) -> int:
        return max((h.max_model_len or 0 for h in self.models().get(model, ())), default=0)

    def contexts(self) -> dict[str, int]:
        """Model (or adapter) name -> the longest context its workers announced (``max_model_len``):
        the longest prompt a request for it can have. A copy, safe to hand to a thread."""
        return dict(self._contexts)

    def update_scaler(self, hb: ScalerHeartbeat) -> None:
        self._scalers.add(hb)
        self._news.set()
        for m in hb.models:
            if m.startup_seconds is not None and m.model not in self._startup:
                self._startup[m.model] = m.startup_seconds  # a worker's own figure is fresher

    def live(self) -> list[Heartbeat]:
        return self._book.live()

    def is_alive(self, worker_id: str) -> bool:
        return self._book.is_alive(worker_id)

    def heard_at(self, worker_id: str) -> float | None:
        """When (``time.monotonic``) the worker's last heartbeat arrived; None if it is not live."""
        return self._book.heard_at(worker_id)

    def models(self) -> dict[str, list[Heartbeat]]:
        """Served model name -> live workers (starting, ready or draining)."""
        return self._book.by_model()

    def serving_models(self) -> list[str]:
        return sorted(m for m, hbs in self.models().items() if any(h.state == "ready" for h in hbs))

    def scaled(self) -> dict[str, ScaledModel]:
        """Model -> what a running autoscaler says of it (the one with most tasks on their way)."""
        out: dict[str, ScaledModel] = {}
        for hb in self._scalers.live():
            for m in hb.models:
                if m.max_workers > 0 and (m.model not in out or m.pending + m.running > out[m.model].pending
                                          + out[m.model].running):
                    out[m.model] = m
        return out

    def startup_seconds(self, model: str) -> float | None:
        """The last measured start-up of a worker of ``model`` (from workers or autoscalers)."""
        return self._startup.get(model)

    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> its base model, as ready workers announce them."""
        return {a: hb.model for hb in self.live() if hb.state == "ready" for a in hb.adapters}

    def queue_for(self, model: str) -> str:
        """The model queue a request for ``model`` goes to: an adapter's is its base model's (also
        while that model is cold, for adapters heard of before). A name nobody announces goes to its
        own queue (the broker refuses it if none exists)."""
        if model in self.models():
            return model
        return self.adapters().get(model) or self._adapter_bases.get(model, model)
