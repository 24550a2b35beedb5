"""The HTTP request and response schemas of /v1 (separate from the internal job records)."""

from __future__ import annotations

import httpx
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from service.jobs.records import MAX_SEED, JobError, JobParams, JobStatus
from service.jobs.webhook_schedule import WebhookEvent, WebhookOutcome
from undiffuse.image_formats import DEFAULT_QUALITY, OutputFormat
from undiffuse.registry import DEFAULT_SAMPLER, SamplerName

MAX_WEBHOOK_URL = 2048


def is_valid_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate, which UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class JobCreate(BaseModel):
    """POST /v1/jobs body. Model-dependent checks (steps, class labels) happen in the route."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a name from GET /v1/models; default: the demo model")
    num_images: int = Field(1, ge=1, description="1..UNDIFFUSE_MAX_IMAGES_PER_JOB")
    steps: int = Field(50, ge=1, description="denoising steps, at most the model's timesteps")
    sampler: SamplerName = DEFAULT_SAMPLER  # type: ignore[assignment]
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM stochasticity")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="chosen and returned when absent")
    class_label: StrictInt | list[StrictInt] | None = Field(
        None, description="one class for every image, or one per image; required by conditional models"
    )
    guidance_scale: float = Field(
        1.0, ge=0.0, le=30.0, allow_inf_nan=False, description="classifier-free guidance; 1 = none"
    )
    previews: StrictBool = Field(
        False, description="stream previews of the first image (its current x0 prediction) as `preview` events"
    )
    output_format: OutputFormat = Field(
        "png", description="how the images are stored: png (lossless), jpeg or webp (lossy, see output_quality)"
    )
    output_quality: StrictInt | None = Field(
        None, ge=1, le=100, description=f"jpeg and webp only: quality 1..100; default {DEFAULT_QUALITY}"
    )
    preview_every: int | None = Field(
        None, ge=1, description="steps between previews (with previews); default: about 8 previews per job"
    )
    webhook_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_WEBHOOK_URL,
        description="http(s) URL to POST the job's events to, signed per Standard Webhooks (README); "
        "its host must resolve to public addresses",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="events to deliver (with webhook_url); default: succeeded, failed, canceled",
    )

    @field_validator("*", mode="before")
    @classmethod
    def _valid_unicode(cls, value):
        """JSON may escape a lone surrogate ("\\ud800"); no UTF-8 can carry it to Redis or back
        in an answer, so it is refused here, naming the field."""
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str) and not is_valid_unicode(item):
                raise ValueError("is not valid Unicode text (it contains a lone surrogate)")
        return value

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is None:
            return None
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError) as e:
            raise ValueError(f"not a URL: {e}") from None
        if parsed.scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        if not parsed.host:
            raise ValueError("must name a host")
        if any(c.isspace() or not c.isprintable() for c in url):
            raise ValueError("must not contain spaces or control characters")
        return url

    @field_validator("webhook_events")
    @classmethod
    def _distinct(cls, events: list[str] | None) -> list[str] | None:
        if events is not None and len(set(events)) != len(events):
            raise ValueError("lists an event twice")
        return events


class Progress(BaseModel):
    images_done: int
    images_total: int
    step: int
    steps: int


class QueuePosition(BaseModel):
    """Where a queued job stands. Neither number grows while the job waits."""

    ahead_row_steps: int = Field(
        description="cost (row-steps: images x steps, x2 with guidance) that will be served before the job's first "
        "shard: its owner's work queued before it, and as much of every other owner's (fair shares)"
    )
    estimated_start_seconds: float | None = Field(
        None, description="seconds until it starts, at the Denoisers' measured throughput (null: none measured yet)"
    )
    estimated_start_at: float | None = Field(None, description="the same as an epoch time")


class ImageResult(BaseModel):
    index: int
    seed: int
    key: str
    url: str


class JobView(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    queue: QueuePosition | None = Field(None, description="while the job is queued: where it stands")
    params: JobParams
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    results: list[ImageResult] = Field(
        default_factory=list,
        description="finished images, by index; none for failed or canceled jobs (their images are deleted)",
    )
    results_next_offset: int | None = Field(
        None, description="more results follow: ask again with results_offset set to this"
    )
    manifest_url: str | None = Field(
        None, description="presigned GET URL of the job's manifest.json, once it has succeeded"
    )
    webhooks: list[WebhookOutcome] = Field(
        default_factory=list,
        description="each webhook event that happened and its delivery: pending (next_attempt_at), delivered or failed",
    )


class JobSummary(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    created_at: float
    finished_at: float | None = None


class JobList(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


class ModelInfo(BaseModel):
    name: str
    image_size: int
    channels: int
    num_classes: int | None
    class_names: list[str] | None = None
    num_timesteps: int
    max_steps: int = Field(
        description="the most `steps` a job of this model may ask for: its timesteps, capped by the service"
    )
    prediction_type: str
    guidance_interval: list[float] | None = Field(
        default=None,
        min_length=2,
        max_length=2,
        description="[low, high]: guidance_scale acts where low < sigma_t <= high, "
        "sigma_t = sqrt((1 - a_bar_t) / a_bar_t); null: at every step",
    )
    default: bool = False


class ModelList(BaseModel):
    models: list[ModelInfo]


class WebhookSecret(BaseModel):
    secret: str = Field(description="whsec_...: verify deliveries with standardwebhooks.Webhook(secret).verify")
