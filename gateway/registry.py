"""Which workers are alive, from their heartbeats: the source of ``/v1/models`` and the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass

from broker_config.messages import Heartbeat
from gateway.metrics import know_model


@dataclass
class WorkerEntry:
    heartbeat: Heartbeat
    received_at: float  # monotonic


class WorkerRegistry:
    def __init__(self, expiry_intervals: float = 3.0) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        self._expiry_intervals = expiry_intervals

    def update(self, hb: Heartbeat) -> None:
        if hb.state == "stopped":
            self._workers.pop(hb.worker_id, None)
        else:
            self._workers[hb.worker_id] = WorkerEntry(hb, time.monotonic())
            know_model(hb.model)

    def _alive(self, entry: WorkerEntry, now: float) -> bool:
        return now - entry.received_at <= entry.heartbeat.interval * self._expiry_intervals

    def live(self) -> list[Heartbeat]:
        now = time.monotonic()
        for worker_id in [w for w, e in self._workers.items() if not self._alive(e, now)]:
            del self._workers[worker_id]
        return [e.heartbeat for e in self._workers.values()]

    def is_alive(self, worker_id: str) -> bool:
        return any(hb.worker_id == worker_id for hb in self.live())

    def models(self) -> dict[str, list[Heartbeat]]:
        """Served model name -> live workers (starting, ready or draining)."""
        out: dict[str, list[Heartbeat]] = {}
        for hb in self.live():
            out.setdefault(hb.model, []).append(hb)
        return out

    def serving_models(self) -> list[str]:
        return sorted(m for m, hbs in self.models().items() if any(h.state == "ready" for h in hbs))
