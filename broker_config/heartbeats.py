"""The latest heartbeat of every worker, forgotten after a few missed intervals.

One book for everyone who listens to ``chatai.workers``: the gateway's registry (which models
are served, whether a request's worker still lives) and the operator tools (``chatai scale
status``, the autoscaler). A worker is live while its last heartbeat is younger than
``expiry_intervals`` of its own announced interval; a ``stopped`` heartbeat forgets it at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker_config.messages import Heartbeat, ScalerHeartbeat


@dataclass
class HeartbeatBook:
    expiry_intervals: float = 3.0
    clock: Callable[[], float] = time.monotonic
    _workers: dict[str, tuple[Heartbeat, float]] = field(default_factory=dict)

    def add(self, hb: Heartbeat) -> None:
        if hb.state == "stopped":
            self._workers.pop(hb.worker_id, None)
        else:
            self._workers[hb.worker_id] = (hb, self.clock())

    def live(self) -> list[Heartbeat]:
        """Workers heard recently enough (starting, ready or draining); the others are dropped."""
        now = self.clock()
        for worker_id in [w for w, (hb, at) in self._workers.items()
                          if now - at > hb.interval * self.expiry_intervals]:
            del self._workers[worker_id]
        return [hb for hb, _ in self._workers.values()]

    def first_heard(self) -> float | None:
        """When (on ``clock``) the longest-known live worker was last heard; None when none is."""
        self.live()
        return min((at for _, at in self._workers.values()), default=None)

    def is_alive(self, worker_id: str) -> bool:
        return any(hb.worker_id == worker_id for hb in self.live())

    def heard_at(self, worker_id: str) -> float | None:
        """When (on ``clock``) this worker's last heartbeat arrived; None if it is not live."""
        self.live()
        entry = self._workers.get(worker_id)
        return None if entry is None else entry[1]

    def by_model(self) -> dict[str, list[Heartbeat]]:
        """Served model name -> live workers."""
        out: dict[str, list[Heartbeat]] = {}
        for hb in self.live():
            out.setdefault(hb.model, []).append(hb)
        return out


@dataclass
class ScalerBook:
    """The latest heartbeat of every running autoscaler, forgotten after a few missed rounds:
    an autoscaler that stopped (or lost its broker connection) no longer promises a worker."""

    expiry_intervals: float = 3.0
    clock: Callable[[], float] = time.monotonic
    _scalers: dict[str, tuple[ScalerHeartbeat, float]] = field(default_factory=dict)

    def add(self, hb: ScalerHeartbeat) -> None:
        self._scalers[hb.scaler_id] = (hb, self.clock())

    def live(self) -> list[ScalerHeartbeat]:
        now = self.clock()
        for scaler_id in [s for s, (hb, at) in self._scalers.items() if now - at > hb.interval * self.expiry_intervals]:
            del self._scalers[scaler_id]
        return [hb for hb, _ in self._scalers.values()]


@dataclass(frozen=True)
class PrefixCacheFigures:
    """The prefix caches of some workers (one model's), from their heartbeats: prompt tokens
    looked up and found cached since each worker started."""

    queries: int = 0
    hits: int = 0

    @classmethod
    def of(cls, heartbeats: Iterable[Heartbeat]) -> "PrefixCacheFigures":
        hbs = list(heartbeats)
        return cls(sum(h.prefix_cache_queries for h in hbs), sum(h.prefix_cache_hits for h in hbs))

    @property
    def hit_rate(self) -> float | None:
        """Hits / queries; None before any lookup."""
        return self.hits / self.queries if self.queries else None


def percent(rate: float | None) -> str:
    """A hit rate as an operator reads it: "73%", or "-" before any lookup."""
    return "-" if rate is None else f"{rate:.0%}"
