"""The Ingress deployment: the FastAPI app served by Ray Serve, holding a handle to the Denoiser."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from service.api.app import app
from service.api.deps import Context, set_context
from service.api.quotas import SubmissionQuota
from service.jobs.lifecycle import JobLifecycle
from service.jobs.store import JobStore
from service.models import ModelRegistry
from service.settings import Settings
from service.storage import ObjectStore


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: Settings, denoiser: DeploymentHandle, workers: DeploymentHandle) -> None:
        objects = ObjectStore(settings)
        objects.ensure_bucket()
        self.workers = workers  # bound so the Worker deployment is part of the application
        store = JobStore.from_url(
            settings.redis_url, settings.job_ttl_seconds, settings.shard_size, settings.redis_timeout_seconds
        )
        set_context(
            Context(
                settings=settings,
                store=store,
                lifecycle=JobLifecycle(store, purge_delay_seconds=settings.purge_delay_seconds),
                objects=objects,
                registry=ModelRegistry(settings.model_dir, settings.default_model),
                denoiser=denoiser,
                quota=SubmissionQuota(settings),
            )
        )
