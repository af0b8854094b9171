"""``/v1/models``: the models this deployment serves (from the models config)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from scheduler.api.auth import Tenant
from scheduler.api.context import ApiContext, get_context
from scheduler.api.errors import ApiError
from scheduler.api.openapi import errors
from scheduler.api.schemas import ModelList, ModelObject

router = APIRouter(prefix="/v1", tags=["models"], responses=errors(401, 403, 429, 500, 503))

Context = Annotated[ApiContext, Depends(get_context)]


@router.get("/models", response_model=ModelList)
def list_models(_tenant: Tenant, context: Context) -> ModelList:
    return ModelList(
        data=[
            ModelObject.from_served(model, context.models_loaded_at)
            for model in context.models.values()
        ]
    )


@router.get("/models/{model_id}", response_model=ModelObject, responses=errors(404))
def retrieve_model(model_id: str, _tenant: Tenant, context: Context) -> ModelObject:
    model = context.models.get(model_id)
    if model is None:
        raise ApiError(
            404, f"The model '{model_id}' does not exist", param="model", code="model_not_found"
        )
    return ModelObject.from_served(model, context.models_loaded_at)
