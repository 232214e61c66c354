"""``GET /v1/models``: the models that live workers serve right now."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from gateway.context import GatewayContext, get_context, require_api_key
from gateway.errors import model_not_found

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])


def _model(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "chatai"}


@router.get("/models")
async def list_models(ctx: GatewayContext = Depends(get_context)) -> dict:
    return {"object": "list", "data": [_model(m) for m in ctx.registry.serving_models()]}


@router.get("/models/{model:path}")
async def get_model(model: str, ctx: GatewayContext = Depends(get_context)) -> dict:
    if model not in ctx.registry.serving_models():
        raise model_not_found(model)
    return _model(model)
