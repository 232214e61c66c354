"""The autoscaler's heartbeat: how gateways learn that a cold model is worth waiting for.

A gateway sees workers only through their heartbeats; once a model is scaled to zero it sees
nothing, and could only fail its requests. Each autoscaler round therefore tells every gateway,
on the workers exchange, which models it starts workers for on demand, its tasks on their way,
and how long the last worker of each model took to start (from the workers' own heartbeats).
A gateway that stops hearing it (the autoscaler stopped) stops promising a worker.

The operator broker user may publish on the workers exchange and nowhere else
(``broker_config/definitions.py``). On a broker whose definitions predate that, the publish is
refused: the autoscaler says so once and goes on scaling.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractRobustConnection

from broker_config import topology as t
from broker_config.messages import CONTENT_TYPE, SCALER_MESSAGE_TYPE, Heartbeat, ScaledModel, ScalerHeartbeat

log = logging.getLogger("chatai.autoscale")


@dataclass
class StartupTimes:
    """The last measured start-up per model, from ready workers' heartbeats."""

    seconds: dict[str, float] = field(default_factory=dict)

    def learn(self, heartbeats: list[Heartbeat]) -> None:
        for hb in heartbeats:
            if hb.startup_seconds is not None:
                self.seconds[hb.model] = hb.startup_seconds


class Announcer:
    """Publishes one ``ScalerHeartbeat`` per autoscaler round on a channel of its own."""

    def __init__(self, connection: AbstractRobustConnection, interval: float) -> None:
        self._connection = connection
        self._channel: AbstractChannel | None = None
        self.interval = interval
        self.scaler_id = f"{socket.gethostname()}-{os.getpid()}"
        self._warned = False

    async def announce(self, models: list[ScaledModel]) -> bool:
        """Send this round's heartbeat; False (and one warning) when the broker refuses it."""
        hb = ScalerHeartbeat(scaler_id=self.scaler_id, models=models, interval=self.interval, sent_at=time.time())
        try:
            if self._channel is None or self._channel.is_closed:
                # confirms: a refused publish (old definitions) raises here instead of passing silently
                self._channel = await self._connection.channel(publisher_confirms=True)
            exchange = await self._channel.get_exchange(t.WORKERS_EXCHANGE, ensure=False)
            await exchange.publish(
                aio_pika.Message(hb.encode(), content_type=CONTENT_TYPE, type=SCALER_MESSAGE_TYPE,
                                 delivery_mode=aio_pika.DeliveryMode.NOT_PERSISTENT,
                                 expiration=max(1.0, self.interval * 3)),
                routing_key="", mandatory=False, timeout=5)
        except Exception as exc:  # noqa: BLE001 - scaling goes on without the announcement
            self._channel = None
            if not self._warned:
                self._warned = True
                log.warning("could not announce this autoscaler to the gateways (%s: %s); they will not wait for "
                            "cold models. Re-apply the broker definitions (chatai broker apply) so that the operator "
                            "user may publish on %s.", type(exc).__name__, exc, t.WORKERS_EXCHANGE)
            return False
        return True
