"""The FastAPI application: routers, error format, and the lifespan that opens the way in."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from gateway import private
from gateway.cluster.broker import GatewayBroker
from gateway.context import GatewayContext
from gateway.errors import install_error_handlers
from gateway.http_guard import RequestGuard
from gateway.database import Database
from gateway.keys import KeyStore
from gateway.shared_limits import SharedRateLimiter
from gateway.cluster.registry import WorkerRegistry
from gateway.routes import health, inference, models
from gateway.settings import GatewaySettings

log = logging.getLogger("chatai.gateway")


def app_from_environment() -> FastAPI:
    """uvicorn's factory for ``chatai gateway --replicas N``: each worker process is a replica
    with the settings of the environment (which the command filled from its flags)."""
    return create_app(GatewaySettings())


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        private.restrict_umask()  # prompts and completions land under the state directory
        # 0700; the database files and the files directory are made private where they are opened
        # (private.connect, FileStore), which also fixes what an older run or `keys create` left.
        private.private_dir(settings.state_dir)
        registry = WorkerRegistry(settings.worker_expiry_intervals)
        url = settings.broker_url.get_secret_value()
        tunnel = None
        if not settings.broker_direct:
            from gateway.cluster.tunnel import BrokerTunnel

            # AMQP goes through the tunnel in-process: the URL gives only credentials and vhost.
            tunnel = BrokerTunnel.from_settings(settings)
            await tunnel.start()
        broker = GatewayBroker(url, registry, reconnect_interval=settings.broker_reconnect_interval,
                               transport=tunnel.transport() if tunnel is not None else None)
        broker.start()
        keys = KeyStore(settings.database)
        ctx = GatewayContext(settings=settings, keys=keys, registry=registry, broker=broker, tunnel=tunnel)
        if keys.shared:  # replicas on one PostgreSQL database: the limits hold for all of them
            ctx.limiter = SharedRateLimiter(Database(settings.database))
        await ctx.limiter.start()
        app.state.ctx = ctx
        for hook in app.state.startup_hooks:
            await hook(ctx)
        # Start-up objects are permanent: keep full collections from walking them on the
        # request path (the same reason vLLM's server freezes its heap after start-up).
        gc.collect()
        gc.freeze()
        try:
            yield
        finally:
            for hook in app.state.shutdown_hooks:
                await hook(ctx)
            await ctx.limiter.stop()
            await broker.close()
            if tunnel is not None:
                await tunnel.close()
            ctx.keys.close()

    # Swagger UI loads its scripts from a CDN, on the same origin as the chat page's storage (the
    # key, conversations): off unless the operator asks for it. /openapi.json is plain JSON.
    app = FastAPI(title="chatai gateway", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs" if settings.api_docs else None, redoc_url=None)
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(inference.router)
    from gateway.batches import install as install_batches

    batches = install_batches(app, settings)  # /v1/files, /v1/batches and the batch dispatcher
    app.add_middleware(RequestGuard, keys=lambda: app.state.ctx.keys, max_body_bytes=settings.max_request_bytes,
                       max_file_bytes=batches.max_file_bytes)
    from gateway.web import install as install_web

    install_web(app)  # the chat page at /, the status page at /status and its /api/status
    return app
