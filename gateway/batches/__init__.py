"""The OpenAI Files and Batches API: uploads, batch jobs, and the dispatcher that runs them.

``install(app, settings)`` adds the routes and the lifespan hooks that open the batch store and
start the dispatcher; ``gateway/app.py`` calls it, so nothing else in the gateway knows batches.
See ``docs/batches.md`` for the lifecycle and the exactly-once rule.
"""

from __future__ import annotations

from fastapi import FastAPI

from gateway.batches.config import BatchSettings
from gateway.settings import GatewaySettings


def install(app: FastAPI, settings: GatewaySettings) -> BatchSettings:
    """Returns the batch settings (read once, from ``CHATAI_GATEWAY_BATCH_*``): the app's request
    guard needs their upload limit."""
    from gateway.batches.routes import batches_router, files_router
    from gateway.batches.service import start_batches, stop_batches

    batch_settings = BatchSettings()
    app.include_router(files_router)
    app.include_router(batches_router)

    async def _start(ctx) -> None:
        app.state.batches = await start_batches(ctx, batch_settings)

    async def _stop(ctx) -> None:
        service = getattr(app.state, "batches", None)
        if service is not None:
            await stop_batches(service)

    app.state.startup_hooks.append(_start)
    app.state.shutdown_hooks.append(_stop)
    return batch_settings
