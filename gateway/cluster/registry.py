"""Which workers are alive, from their heartbeats: the source of ``/v1/models`` and the metrics."""

from __future__ import annotations

from broker_config.heartbeats import HeartbeatBook
from broker_config.messages import Heartbeat
from gateway.metrics import know_model


class WorkerRegistry:
    """The gateway's heartbeat book, plus what the API asks of it."""

    def __init__(self, expiry_intervals: float = 3.0) -> None:
        self._book = HeartbeatBook(expiry_intervals)

    def update(self, hb: Heartbeat) -> None:
        self._book.add(hb)
        if hb.state != "stopped":
            know_model(hb.model)

    def live(self) -> list[Heartbeat]:
        return self._book.live()

    def is_alive(self, worker_id: str) -> bool:
        return self._book.is_alive(worker_id)

    def models(self) -> dict[str, list[Heartbeat]]:
        """Served model name -> live workers (starting, ready or draining)."""
        return self._book.by_model()

    def serving_models(self) -> list[str]:
        return sorted(m for m, hbs in self.models().items() if any(h.state == "ready" for h in hbs))

    def adapters(self) -> dict[str, str]:
        """LoRA adapter name -> its base model, as ready workers announce them."""
        return {a: hb.model for hb in self.live() if hb.state == "ready" for a in hb.adapters}

    def queue_for(self, model: str) -> str:
        """The model queue a request for ``model`` goes to: an adapter's is its base model's.
        A name nobody announces goes to its own queue (the broker refuses it if none exists)."""
        if model in self.models():
            return model
        return self.adapters().get(model, model)
