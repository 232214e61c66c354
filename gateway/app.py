"""The FastAPI application: routers, error format, and the lifespan that opens the way in."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.broker import GatewayBroker
from gateway.context import GatewayContext
from gateway.errors import APIError, install_error_handlers
from gateway.keys import KeyStore
from gateway.registry import WorkerRegistry
from gateway.routes import completions, health, models
from gateway.settings import GatewaySettings

log = logging.getLogger("chatai.gateway")


class BodyLimit:
    """Refuse oversized JSON bodies before reading them (file uploads have their own limit).

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide client disconnects from
    the handlers, and those cancel generations.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope["path"].startswith("/v1/files"):
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.max_bytes:
                response = APIError(413, f"Request body larger than {self.max_bytes} bytes.",
                                    code="request_too_large").response()
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        registry = WorkerRegistry(settings.worker_expiry_intervals)
        url = settings.broker_url.get_secret_value()
        tunnel = None
        if not settings.broker_direct:
            from gateway.tunnel import BrokerTunnel

            # AMQP goes through the tunnel in-process: the URL gives only credentials and vhost.
            tunnel = BrokerTunnel.from_settings(settings)
            await tunnel.start()
        broker = GatewayBroker(url, registry, transport=tunnel.transport() if tunnel is not None else None)
        broker.start()
        ctx = GatewayContext(settings=settings, keys=KeyStore(settings.db_path), registry=registry,
                             broker=broker, tunnel=tunnel)
        app.state.ctx = ctx
        for hook in app.state.startup_hooks:
            await hook(ctx)
        try:
            yield
        finally:
            for hook in app.state.shutdown_hooks:
                await hook(ctx)
            await broker.close()
            if tunnel is not None:
                await tunnel.close()
            ctx.keys.close()

    app = FastAPI(title="chatai gateway", version="0.1.0", lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.startup_hooks = []
    app.state.shutdown_hooks = []
    app.add_middleware(BodyLimit, max_bytes=settings.max_request_bytes)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(models.router)
    app.include_router(completions.router)
    from gateway.batches import install as install_batches

    install_batches(app, settings)  # /v1/files, /v1/batches and the batch dispatcher
    return app
