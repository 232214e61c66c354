"""``GET /v1/models``: the deployment's models, whether or not a worker serves them right now,
with their LoRA adapters (each listed as a model of its own, with its base model as ``parent``,
as vLLM lists them).

A model scaled to zero stays listed: it is one of the deployment's models, and a request for
it waits for a worker to start (``gateway/cluster/cold_start.py``). Each entry carries
extension fields: ``state`` (``ready``, ``starting`` or ``cold``), ``on_demand`` (a running
autoscaler starts a worker when a request waits) and ``startup_seconds`` (how long the last
worker took to load). The list is the models of live workers, of running autoscalers and of
``CHATAI_GATEWAY_MODELS``.

Without a connection to the cluster (circuit breaker tripped, tunnel or broker down) the gateway
cannot know what is served, and every generation would fail: both endpoints then answer 503
``service_paused`` in the OpenAI error format, like every other API call, rather than an empty
list (which clients would read as "this service has no models") or a stale one (which promises
models that cannot answer). The OpenAI SDKs retry a 503 by themselves. See docs/api.md.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.cluster.cold_start import listed_models, view
from gateway.cluster.errors import ClusterUnavailable
from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import model_not_found

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model(name: str, parent: str | None = None, **extra: object) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatai", "root": parent or name,
            "parent": parent, **extra}


def _listed(ctx: GatewayContext) -> dict[str, dict]:
    if not ctx.broker.connected:
        raise ClusterUnavailable()
    models = {m: _model(m, **view(ctx.registry, m).fields())
              for m in listed_models(ctx.registry, ctx.settings.models)}
    for adapter, base in sorted(ctx.registry.adapters().items()):
        models.setdefault(adapter, _model(adapter, base, **view(ctx.registry, base).fields()))
    return models


def known_models(ctx: GatewayContext) -> list[str]:
    """The names ``GET /v1/models`` lists (none while the cluster is unreachable), for a 404."""
    try:
        return list(_listed(ctx))
    except ClusterUnavailable:
        return []


@router.get("/models")
async def list_models(ctx: GatewayContext = Depends(get_context)) -> dict:
    return {"object": "list", "data": list(_listed(ctx).values())}


@router.get("/models/{model:path}")
async def get_model(model: str, ctx: GatewayContext = Depends(get_context)) -> dict:
    found = _listed(ctx).get(model)
    if found is None:
        raise model_not_found(model, known_models(ctx))
    return found
