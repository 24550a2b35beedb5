"""A submission's parameters checked against the model and the server's limits, and what an
Idempotency-Key is compared on."""

from __future__ import annotations

import secrets

from service.api.deps import Context
from service.api.errors import invalid
from service.api.schemas import JobCreate
from service.jobs.events import MAX_PREVIEWS, default_preview_every
from service.jobs.records import JobParams
from undiffuse.config import ModelSpec
from undiffuse.image_formats import DEFAULT_QUALITY, IMAGE_FORMATS


def resolve_params(body: JobCreate, ctx: Context) -> JobParams:
    """Check what depends on the model and the server's limits; fill the defaults."""
    model = ctx.registry.get(body.model)
    if model is None:
        raise invalid("model", f"unknown model {body.model!r}; available: {', '.join(ctx.registry.models)}", body.model)
    limit = ctx.settings.max_images_per_job
    if body.num_images > limit:
        raise invalid("num_images", f"must be at most {limit}", body.num_images)
    max_steps = min(model.schedule.num_timesteps, ctx.settings.max_steps)
    if body.steps > max_steps:
        raise invalid("steps", f"must be at most {max_steps} for model {model.name!r}", body.steps)
    check_labels(body, model)
    cost = body.num_images * body.steps * (2 if body.guidance_scale != 1.0 else 1)  # JobParams.cost
    if cost > ctx.settings.max_job_cost:
        raise invalid(
            "num_images",
            f"the job costs {cost:,} image-steps (num_images x steps, x2 with guidance); "
            f"the limit is {ctx.settings.max_job_cost:,}: use fewer images or steps, or split the job",
            body.num_images,
        )
    if body.preview_every is not None and not body.previews:
        raise invalid("preview_every", "needs previews: true", body.preview_every)
    fewest = -(-body.steps // MAX_PREVIEWS)
    if body.previews and body.preview_every is not None and body.preview_every < fewest:
        raise invalid(
            "preview_every",
            f"must be at least {fewest} for {body.steps} steps (at most {MAX_PREVIEWS} previews)",
            body.preview_every,
        )
    lossy = IMAGE_FORMATS[body.output_format].lossy
    if body.output_quality is not None and not lossy:
        raise invalid("output_quality", f"applies to jpeg and webp, not {body.output_format}", body.output_quality)
    return JobParams(
        model=model.name,
        num_images=body.num_images,
        steps=body.steps,
        sampler=body.sampler,
        eta=body.eta,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        class_label=body.class_label,
        guidance_scale=body.guidance_scale,
        previews=body.previews,
        preview_every=(body.preview_every or default_preview_every(body.steps)) if body.previews else None,
        output_format=body.output_format,
        output_quality=(body.output_quality or DEFAULT_QUALITY) if lossy else None,
    )


def hashed_body(body: JobCreate) -> dict:
    """What an Idempotency-Key is compared on: the body with its defaults filled in, less the
    preview, webhook and output fields at their defaults (a body that never names them hashes the
    same whichever of these fields the service has)."""
    dump = body.model_dump()
    if body.output_format == "png" and body.output_quality is None:
        del dump["output_format"], dump["output_quality"]
    if not body.previews and body.preview_every is None:
        del dump["previews"], dump["preview_every"]
    if body.webhook_url is None and body.webhook_events is None:
        del dump["webhook_url"], dump["webhook_events"]
    return dump


def check_labels(body: JobCreate, model: ModelSpec) -> None:
    labels = body.class_label
    if model.num_classes is None:
        if labels is not None:
            raise invalid("class_label", f"model {model.name!r} is unconditional; omit class_label", labels)
        if body.guidance_scale != 1.0:
            raise invalid(
                "guidance_scale", f"model {model.name!r} is unconditional; guidance needs classes", body.guidance_scale
            )
        return
    if body.guidance_scale != 1.0 and not model.guidable:
        raise invalid(
            "guidance_scale",
            f"model {model.name!r} has no unconditional class to guide against; guidance_scale must be 1",
            body.guidance_scale,
        )
    k = model.num_classes
    if labels is None:
        raise invalid("class_label", f"required: model {model.name!r} is class-conditional (0..{k - 1})", None)
    if isinstance(labels, list) and len(labels) != body.num_images:
        raise invalid("class_label", f"has {len(labels)} labels for {body.num_images} images", labels)
    for value in labels if isinstance(labels, list) else [labels]:
        if not 0 <= value < k:
            raise invalid("class_label", f"{value} is out of range 0..{k - 1}", labels)
