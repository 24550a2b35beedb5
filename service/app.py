"""The application builder: one typed entry point for `serve run`, `serve deploy` and a
KubeRay RayService (import_path: service.app:build_app).

    serve run service.app:build_app denoiser_replicas=2 denoiser_num_gpus=1
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from service.denoiser import Denoiser
from service.ingress import Ingress
from service.models import ModelRegistry
from service.settings import Settings
from worker.deployment import Worker


class DenoiserAutoscaling(BaseModel):
    """Scale the Denoiser with the queue's backlog and the replicas' measured throughput
    (service.autoscaling.BacklogPolicy)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    drain_target_seconds: float = Field(
        60.0, gt=0, description="replicas enough to serve the backlog within this long at their measured throughput"
    )
    owner_share: float = Field(
        0.5, gt=0, le=1, description="the fraction of max_replicas one owner's waiting work may scale to by itself"
    )
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(300.0, ge=0)

    def to_serve(self) -> dict[str, Any]:
        if self.max_replicas < max(1, self.min_replicas):
            raise ValueError("denoiser_autoscaling.max_replicas must be >= max(1, min_replicas)")
        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": max(1, self.min_replicas),
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "policy": {
                "policy_function": "service.autoscaling:BacklogPolicy",
                "policy_kwargs": {"drain_target_seconds": self.drain_target_seconds, "owner_share": self.owner_share},
            },
        }


class AppArgs(BaseModel):
    """How the application is laid out on the cluster. Service behaviour lives in Settings.

    Unknown fields are refused, so a config written for an older release (sampler_num_gpus,
    now denoiser_num_gpus) fails to deploy instead of silently running without a GPU."""

    model_config = ConfigDict(extra="forbid")

    denoiser_replicas: int = Field(1, ge=1, description="fixed replica count when denoiser_autoscaling is unset")
    denoiser_autoscaling: DenoiserAutoscaling | None = None
    denoiser_num_gpus: float = Field(0.0, ge=0, description="1 on GPU nodes: one GPU per replica")
    denoiser_num_cpus: float = Field(1.0, ge=0)
    max_batch_images: int | None = Field(
        None,
        ge=1,
        description="rows per Denoiser network call (guidance twins count), capped by free GPU memory; unset: on a "
        "GPU what its free memory fits (up to 4,096), on a CPU 2 x shard_size (a guided shard's rows)",
    )
    worker_replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    log_encoding: Literal["TEXT", "JSON"] = Field(
        "TEXT",
        description="JSON: every replica's log file (Ray's logs/serve/) holds one JSON object per line, "
        "with the job, shard, owner, attempt, status and duration_ms of job events, for a log shipper",
    )
    settings: dict[str, Any] = Field(default_factory=dict, description="overrides of UNDIFFUSE_* settings")

    def cpus_needed(self) -> float:
        """Ray CPUs the initial replicas reserve (Denoiser, Worker and Ingress; Serve's controller
        and proxies take none). A single-node Ray started with fewer never schedules them all and
        `serve.run` waits forever, so service.run starts Ray with at least this many."""
        denoisers = (
            max(1, self.denoiser_autoscaling.min_replicas) if self.denoiser_autoscaling else self.denoiser_replicas
        )
        return (
            denoisers * self.denoiser_num_cpus
            + self.worker_replicas * Worker.ray_actor_options["num_cpus"]
            + self.ingress_replicas * Ingress.ray_actor_options["num_cpus"]
        )


def build_app(args: AppArgs) -> Application:
    settings = Settings(**args.settings)
    if args.max_batch_images is not None and settings.min_batch_rows > args.max_batch_images:
        raise ValueError(
            f"max_batch_images {args.max_batch_images} must be at least twice shard_size {settings.shard_size} "
            "(a guided shard takes twice its images in rows)"
        )
    ModelRegistry(settings.model_dir, settings.default_model)  # fail fast on a bad model dir
    replicas: dict[str, Any] = (
        {"num_replicas": "auto", "autoscaling_config": args.denoiser_autoscaling.to_serve()}
        if args.denoiser_autoscaling
        else {"num_replicas": args.denoiser_replicas}
    )
    logs = {"encoding": args.log_encoding}
    denoiser = Denoiser.options(
        **replicas,
        ray_actor_options={"num_cpus": args.denoiser_num_cpus, "num_gpus": args.denoiser_num_gpus},
        user_config={"max_batch_images": args.max_batch_images},
        logging_config=logs,
    ).bind(settings)
    workers = Worker.options(num_replicas=args.worker_replicas, logging_config=logs).bind(settings, denoiser)
    return Ingress.options(num_replicas=args.ingress_replicas, logging_config=logs).bind(settings, denoiser, workers)
