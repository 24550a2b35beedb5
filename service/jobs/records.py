"""Typed job records: job states, resolved parameters, the shard task on the queue and what
the Denoiser returns. (The HTTP request and response schemas are service.api.schemas.)"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel

from undiffuse.image_formats import IMAGE_FORMATS, OutputFormat
from undiffuse.registry import SamplerName, sampler_entry

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


class JobError(BaseModel):
    code: str
    message: str


class JobParams(BaseModel):
    """The validated, fully resolved parameters stored with a job."""

    model: str
    num_images: int
    steps: int
    sampler: SamplerName
    eta: float
    seed: int
    class_label: int | list[int] | None
    guidance_scale: float
    previews: bool = False
    preview_every: int | None = None  # steps between previews of the first image; set when previews
    output_format: OutputFormat = "png"
    output_quality: int | None = None  # JPEG and WebP: 1..100; None for PNG

    @property
    def image_suffix(self) -> str:
        """The file suffix of the job's images (.png, .jpg, .webp)."""
        return IMAGE_FORMATS[self.output_format].suffix

    @property
    def cost(self) -> int:
        """Image-steps: num_images x steps, x2 with guidance (a null-class twin per image), what
        max_job_cost and the owners' cost quotas count."""
        return self.num_images * self.steps * (2 if self.guidance_scale != 1.0 else 1)

    def labels_for(self, start: int, count: int) -> list[int] | None:
        if self.class_label is None:
            return None
        if isinstance(self.class_label, int):
            return [self.class_label] * count
        return self.class_label[start : start + count]

    @property
    def sampler_options(self) -> dict[str, float]:
        """The job's options that its sampler takes (see undiffuse.registry)."""
        return sampler_entry(self.sampler).select({"eta": self.eta})


class ShardTask(BaseModel):
    """One message on the shard stream: images [start, start + count) of a job."""

    job_id: str
    shard: int
    start: int
    count: int
    owner: str | None = None  # who submitted the job: the Denoiser shares its batch fairly by owner
    attempt: int = 1
    interruptions: int = 0  # times a replica died under the shard: not the shard's failure
    last_error: str | None = None  # the detail, for logs and the dead-letter stream only
    last_error_kind: str | None = None  # what tenants are told (worker.consumer.PUBLIC_REASONS)
    params: JobParams


class ShardResult(BaseModel):
    """What the Denoiser returns for a shard: PNG-ready pixels, or canceled."""

    job_id: str
    shard: int
    canceled: bool = False
    pixels: bytes = b""  # uint8 [count, H, W, C], C-contiguous
    shape: tuple[int, int, int, int] = (0, 0, 0, 0)
