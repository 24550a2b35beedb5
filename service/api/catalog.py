"""/v1/models: what can be generated."""

from fastapi import APIRouter

from service.api.deps import Ctx, Owner
from service.schemas import ModelList

router = APIRouter(prefix="/v1/models", tags=["models"])


@router.get("", response_model=ModelList)
async def list_models(ctx: Ctx, _owner: Owner) -> ModelList:
    return ModelList(models=list(ctx.registry.models.values()))
