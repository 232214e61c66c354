"""``GET /v1/models``: the models that live workers serve right now.

Without a connection to the cluster (circuit breaker tripped, tunnel or broker down) the gateway
cannot know what is served, and every generation would fail: both endpoints then answer 503
``service_paused`` in the OpenAI error format, like every other API call, rather than an empty
list (which clients would read as "this service has no models") or a stale one (which promises
models that cannot answer). The OpenAI SDKs retry a 503 by themselves. See docs/api.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.cluster_errors import ClusterUnavailable
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import model_not_found

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatai"}


def _serving(ctx: GatewayContext) -> list[str]:
    if not ctx.broker.connected:
        raise ClusterUnavailable()
    return ctx.registry.serving_models()


@router.get("/models")
async def list_models(ctx: GatewayContext = Depends(get_context)) -> dict:
    return {"object": "list", "data": [_model(m) for m in _serving(ctx)]}


@router.get("/models/{model:path}")
async def get_model(model: str, ctx: GatewayContext = Depends(get_context)) -> dict:
    if model not in _serving(ctx):
        raise model_not_found(model)
    return _model(model)
