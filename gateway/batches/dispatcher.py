"""The batch dispatcher: the feeder (lines out) and the results collector, run together.

``Feeder`` (``feeder.py``) drives each batch through its lifecycle and publishes its lines;
``ResultCollector`` (``collector.py``) takes their results off this deployment's durable results
queue into the store. Both keep their state only in the database (``BatchStore``), so the gateway can
stop at any moment and a restart resumes from what was committed. This module starts and stops
them and wakes the feeder when something changed (a new batch, a cancel, committed results).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from broker_config.timing import run_periodically
from gateway.batches.collector import ResultCollector
from gateway.batches.config import BatchSettings
from gateway.batches.feeder import Feeder, KeyBudget
from gateway.batches.files import FileStore
from gateway.batches.store import BatchStore
from gateway.cluster.broker import GatewayBroker
from gateway.database import replica_name

log = logging.getLogger("chatai.gateway.batches")


class Dispatcher:
    def __init__(self, broker: GatewayBroker, store: BatchStore, files: FileStore, settings: BatchSettings,
                 queue_for: Callable[[str], str] = lambda model: model, keys: KeyBudget | None = None,
                 charge: Callable[[str, int], None] = lambda key_id, tokens: None) -> None:
        self.broker = broker
        self.store = store
        self.settings = settings
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._database_id = store.deployment_id()  # names this database's results queue
        # This process among the replicas sharing the database: the holder of its batches' leases.
        self.replica = replica_name()
        self.feeder = Feeder(broker, store, files, settings, self.results_queue, queue_for, keys,
                             replica=self.replica)
        self.collector = ResultCollector(store, settings, on_committed=self.wake, charge=charge)

    @property
    def results_queue(self) -> str:
        """This database's durable results queue, under the deployment's broker namespace."""
        return self.settings.results_queue or self.broker.batch_results_queue(self._database_id)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(run_periodically(self.feeder.tick, self.settings.tick, what="batch dispatcher step",
                                                 logger=log, wake=self._wake, error_pause=1.0),
                                name="batch-dispatcher"),
            asyncio.create_task(self.collector.consume(self.broker.consume_batch_results, self.results_queue),
                                name="batch-results"),
            asyncio.create_task(self.collector.write(), name="batch-results-writer"),
        ]

    async def stop(self) -> None:
        """Stop taking results first (unacked ones go back to the queue), then the loops."""
        await self.collector.stop_consuming()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        try:  # another replica (or this one restarted) takes the batches on at once
            released = await asyncio.to_thread(self.store.release_batches, self.replica)
        except Exception as exc:  # noqa: BLE001 - the leases then run out by themselves
            log.warning("could not release this replica's batches (%s)", type(exc).__name__)
        else:
            if released:
                log.info("released %d batches for the other replicas", released)

    def wake(self) -> None:
        self._wake.set()
