"""Which workers are alive, from their heartbeats: the source of ``/v1/models`` and the metrics."""

from __future__ import annotations

from broker_config.heartbeats import HeartbeatBook
from broker_config.messages import Heartbeat
from gateway.metrics import know_model


class WorkerRegistry:
    """The gateway's heartbeat book, plus what the API asks of it."""

    def __init__(self, expiry_intervals: float = 3.0) -> None:
        self._book = HeartbeatBook(expiry_intervals)
        # The last context each model was announced with: it still bounds requests that wait for a
        # worker while none is up (scaled to zero). A handful of ints per model, never forgotten.
        self._contexts: dict[str, int] = {}

    def update(self, hb: Heartbeat) -> None:
        self._book.add(hb)
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
