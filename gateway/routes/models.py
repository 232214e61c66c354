"""``GET /v1/models``: the models that live workers serve right now, with their LoRA adapters
(each listed as a model of its own, with its base model as ``parent``, as vLLM lists them).

Without a connection to the cluster (circuit breaker tripped, tunnel or broker down) the gateway
cannot know what is served, and every generation would fail: both endpoints then answer 503
``service_paused`` in the OpenAI error format, like every other API call, rather than an empty
list (which clients would read as "this service has no models") or a stale one (which promises
models that cannot answer). The OpenAI SDKs retry a 503 by themselves. See docs/api.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.cluster.errors import ClusterUnavailable
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import model_not_found

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model(name: str, parent: str | None = None) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatai", "root": parent or name,
            "parent": parent}


def _serving(ctx: GatewayContext) -> dict[str, dict]:
    if not ctx.broker.connected:
        raise ClusterUnavailable()
    models = {m: _model(m) for m in ctx.registry.serving_models()}
    for adapter, base in sorted(ctx.registry.adapters().items()):
        models.setdefault(adapter, _model(adapter, base))
    return models


@router.get("/models")
async def list_models(ctx: GatewayContext = Depends(get_context)) -> dict:
    return {"object": "list", "data": list(_serving(ctx).values())}


@router.get("/models/{model:path}")
async def get_model(model: str, ctx: GatewayContext = Depends(get_context)) -> dict:
    found = _serving(ctx).get(model)
    if found is None:
        raise model_not_found(model)
    return found
