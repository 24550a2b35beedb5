"""Typed records: job states, the shard task on the queue, and the HTTP request/response schemas."""

from __future__ import annotations

from enum import Enum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


class JobStatus(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (JobStatus.succeeded, JobStatus.failed, JobStatus.canceled)


# --- the HTTP request ----------------------------------------------------------------------------
class JobCreate(BaseModel):
    """POST /v1/jobs body. Model-dependent checks (steps, class labels) happen in the route."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="a name from GET /v1/models; default: the demo model")
    num_images: int = Field(1, ge=1, description="1..UNDIFFUSE_MAX_IMAGES_PER_JOB")
    steps: int = Field(50, ge=1, description="denoising steps, at most the model's timesteps")
    sampler: Literal["ddpm", "ddim"] = "ddim"
    eta: float = Field(0.0, ge=0.0, le=1.0, description="DDIM stochasticity")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="chosen and returned when absent")
    class_label: int | list[int] | None = Field(
        None, description="one class for every image, or one per image; required by conditional models"
    )
    guidance_scale: float = Field(1.0, ge=0.0, le=30.0, description="classifier-free guidance; 1 = none")


class JobParams(BaseModel):
    """The validated, fully resolved parameters stored with a job."""

    model: str
    num_images: int
    steps: int
    sampler: Literal["ddpm", "ddim"]
    eta: float
    seed: int
    class_label: int | list[int] | None
    guidance_scale: float

    def labels_for(self, start: int, count: int) -> list[int] | None:
        if self.class_label is None:
            return None
        if isinstance(self.class_label, int):
            return [self.class_label] * count
        return self.class_label[start : start + count]


# --- the queue -----------------------------------------------------------------------------------
class ShardTask(BaseModel):
    """One message on the shard stream: images [start, start + count) of a job."""

    job_id: str
    shard: int
    start: int
    count: int
    attempt: int = 1
    last_error: str | None = None
    params: JobParams

    @property
    def batch_key(self) -> tuple:
        """Shards with the same key can be denoised as one batch."""
        p = self.params
        return (p.model, p.sampler, p.steps, p.eta, p.guidance_scale)


class ShardResult(BaseModel):
    """What the Sampler returns for a shard: PNG-ready pixels, or canceled."""

    job_id: str
    shard: int
    canceled: bool = False
    pixels: bytes = b""  # uint8 [count, H, W, C], C-contiguous
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)


# --- the HTTP responses --------------------------------------------------------------------------
class Progress(BaseModel):
    images_done: int
    images_total: int
    step: int
    steps: int


class JobError(BaseModel):
    code: str
    message: str


class ImageResult(BaseModel):
    index: int
    seed: int
    key: str
    url: str


class JobView(BaseModel):
    id: str
    status: JobStatus
    progress: Progress
    params: JobParams
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: JobError | None = None
    results: list[ImageResult] = Field(default_factory=list)


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
    prediction_type: str
    default: bool = False


class ModelList(BaseModel):
    models: list[ModelInfo]
