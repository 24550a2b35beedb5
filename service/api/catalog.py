"""/v1/models: what can be generated."""

from fastapi import APIRouter

from service.api.deps import UNAUTHORIZED, Ctx, Reader
from service.api.schemas import ModelInfo, ModelList
from undiffuse.config import ModelSpec

router = APIRouter(prefix="/v1/models", tags=["models"], responses=UNAUTHORIZED)


def model_info(spec: ModelSpec, default: bool, max_steps: int) -> ModelInfo:
    """max_steps: the service's UNDIFFUSE_MAX_STEPS, which caps the model's own timesteps."""
    return ModelInfo(
        name=spec.name,
        image_size=spec.image_size,
        channels=spec.channels,
        num_classes=spec.num_classes,
        class_names=list(spec.class_names) if spec.class_names else None,
        num_timesteps=spec.schedule.num_timesteps,
        max_steps=min(spec.schedule.num_timesteps, max_steps),
        prediction_type=spec.prediction_type,
        guidance_interval=list(spec.guidance_interval) if spec.guidance_interval else None,
        default=default,
    )


@router.get("", response_model=ModelList)
async def list_models(ctx: Ctx, _owner: Reader) -> ModelList:
    registry = ctx.registry
    cap = ctx.settings.max_steps
    return ModelList(models=[model_info(spec, name == registry.default, cap) for name, spec in registry.models.items()])
