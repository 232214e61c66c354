"""The batch service the routes use: store, file contents, dispatcher and the expiry sweeper.

Built by the app's startup hook, closed by its shutdown hook. Deleting and expiring live here,
so that a file's row and its contents always go together.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from broker_config.timing import run_periodically
from gateway.batches.config import BatchSettings
from gateway.batches.dispatcher import Dispatcher
from gateway.batches.files import FileStore
from gateway.batches.store import BatchStore, now

log = logging.getLogger("chatai.gateway.batches")


@dataclass
class BatchService:
    settings: BatchSettings
    store: BatchStore
    files: FileStore
    dispatcher: Dispatcher
    _sweeper: asyncio.Task | None = field(default=None, repr=False)

    def delete_file(self, file_id: str) -> bool:
        """Row first: once it is gone nobody can reach the contents, which go next."""
        deleted = self.store.delete_file(file_id)
        self.files.delete(file_id)
        return deleted

    def sweep(self) -> tuple[int, int]:
        """Delete expired files and finished batches past their retention."""
        files = 0
        for file_id in self.store.expired_files(now()):
            files += self.delete_file(file_id)
        batches = 0
        for batch in self.store.ended_before(int(now() - self.settings.batch_retention)):
            self.store.delete_batch(batch["id"])
            batches += 1
        if files or batches:
            log.info("expiry: deleted %d files and %d batch records", files, batches)
        return files, batches

    async def _sweep_loop(self) -> None:
        await run_periodically(self.sweep, self.settings.sweep_interval, what="expiry sweep", logger=log)


async def start_batches(ctx, settings: BatchSettings) -> BatchService:
    state_dir = ctx.settings.state_dir
    store = BatchStore(settings.db_path or ctx.settings.database)
    files = FileStore(settings.resolve_files(state_dir))
    dispatcher = Dispatcher(ctx.broker, store, files, settings, ctx.registry.queue_for, keys=ctx,
                            charge=ctx.limiter.charge)
    service = BatchService(settings, store, files, dispatcher)
    dispatcher.start()
    service._sweeper = asyncio.create_task(service._sweep_loop(), name="batch-sweeper")
    return service


async def stop_batches(service: BatchService) -> None:
    if service._sweeper is not None:
        service._sweeper.cancel()
        await asyncio.gather(service._sweeper, return_exceptions=True)
    await service.dispatcher.stop()
    service.store.close()
