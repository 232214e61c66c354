"""``GET /health`` (no key: for load balancers and operators) and ``GET /metrics`` (Prometheus,
behind ``CHATAI_GATEWAY_METRICS_TOKEN`` when it is set)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway.context import GatewayContext, get_context
from gateway.errors import APIError
from gateway.http_guard import token_matches
from broker_config.heartbeats import PrefixCacheFigures
from gateway.metrics import LIVE_WORKERS, PREFIX_CACHE_HIT_RATE, PREFIX_CACHE_TOKENS

router = APIRouter()


@router.get("/health")
async def health(ctx: GatewayContext = Depends(get_context)) -> JSONResponse:
    models: dict[str, dict[str, int]] = {}
    for model, hbs in ctx.registry.models().items():
        cache = PrefixCacheFigures.of(hbs)
        counts = models.setdefault(model, {"starting": 0, "ready": 0, "draining": 0, "capacity": 0, "in_flight": 0,
                                           "prefix_cache_queries": cache.queries, "prefix_cache_hits": cache.hits})
        for hb in hbs:
            counts[hb.state] = counts.get(hb.state, 0) + 1
            counts["capacity"] += hb.capacity
            counts["in_flight"] += hb.in_flight
    tunnel = None
    if ctx.tunnel is not None:
        tunnel = {"state": ctx.tunnel.state, "last_error": ctx.tunnel.last_error}
    ok = ctx.broker.connected
    # A resource alarm on the broker: connected, but it accepts no requests until it clears.
    blocked = ctx.broker.alarm.status() if ok else None
    body = {
        "status": "overloaded" if blocked else "ok" if ok else "unavailable",
        "broker": {"connected": ok, "blocked": blocked, "last_error": None if ok else ctx.broker.last_error},
        "tunnel": tunnel,
        "models": models,
    }
    return JSONResponse(body, status_code=200 if ok and not blocked else 503)


@router.get("/metrics")
async def metrics(request: Request, ctx: GatewayContext = Depends(get_context)) -> Response:
    token = ctx.settings.metrics_token
    if token is not None and not token_matches(request.headers, token.get_secret_value()):
        raise APIError(401, "/metrics needs 'Authorization: Bearer <the metrics token>'.", code="invalid_metrics_token")
    for gauge in (LIVE_WORKERS, PREFIX_CACHE_TOKENS, PREFIX_CACHE_HIT_RATE):
        gauge.clear()
    for model, hbs in ctx.registry.models().items():
        for hb in hbs:
            LIVE_WORKERS.labels(model, hb.state).inc()
        cache = PrefixCacheFigures.of(hbs)
        PREFIX_CACHE_TOKENS.labels(model, "queries").set(cache.queries)
        PREFIX_CACHE_TOKENS.labels(model, "hits").set(cache.hits)
        if cache.hit_rate is not None:
            PREFIX_CACHE_HIT_RATE.labels(model).set(cache.hit_rate)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
