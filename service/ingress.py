"""The Ingress deployment: the FastAPI app served by Ray Serve, holding a handle to the Denoiser."""

from __future__ import annotations

from ray import serve
from ray.serve.handle import DeploymentHandle

from service.api.deps import build_context, set_context
from service.api.fastapi_app import app
from service.settings import Settings


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=256)
@serve.ingress(app)
class Ingress:
    def __init__(self, settings: Settings, denoiser: DeploymentHandle, workers: DeploymentHandle) -> None:
        self.workers = workers  # bound so the Worker deployment is part of the application
        context = build_context(settings, denoiser)
        context.objects.ensure_bucket()
        set_context(context)
