"""/readyz keeps its answer for a second per ingress replica, so a flood of it does not become a
flood of Redis, S3 and Denoiser probes. The FastAPI app in process, with counted probes; no
servers."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from service.api import deps, health
from service.api.fastapi_app import app
from service.models import ModelRegistry
from service.settings import Settings


class Probes:
    """Stand-ins for the job store, the object store and the Denoiser handle, counting calls."""

    def __init__(self, denoiser_ready: bool = True, delay: float = 0.0) -> None:
        self.calls = {"redis": 0, "s3": 0, "sampler": 0}
        self.denoiser_ready = denoiser_ready
        self.delay = delay
        self.ready = self  # ctx.denoiser.ready.remote()

    async def ping(self) -> None:  # ctx.store.ping
        self.calls["redis"] += 1
        await asyncio.sleep(self.delay)

    def remote(self):
        self.calls["sampler"] += 1

        async def answer() -> None:
            if not self.denoiser_ready:
                raise RuntimeError("no replica answers")

        return answer()


class Objects:
    def __init__(self, probes: Probes) -> None:
        self.probes = probes

    def ping(self) -> None:
        self.probes.calls["s3"] += 1


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(health, "clock", clock)
    return clock


@pytest.fixture
def serve(monkeypatch):
    """Sets a context on the given probes; returns a function that GETs /readyz n times at once."""

    def make(probes: Probes, registry: ModelRegistry | None = None):
        settings = Settings()
        context = deps.Context(
            settings=settings,
            store=probes,
            lifecycle=None,
            objects=Objects(probes),
            registry=registry or ModelRegistry(settings.model_dir, settings.default_model),
            denoiser=probes,
        )  # type: ignore[arg-type]
        monkeypatch.setattr(deps, "_context", context)

        def get(n: int = 1) -> list[httpx.Response]:
            async def gets() -> list[httpx.Response]:
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                    return await asyncio.gather(*(client.get("/readyz") for _ in range(n)))

            return asyncio.run(gets())

        return get

    return make


def test_two_calls_in_one_second_probe_once(serve, clock):
    probes = Probes()
    get = serve(probes)
    first = get()[0]
    clock.now += 0.9
    second = get()[0]
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json() == {"status": "ready", "checks": {"redis": "ok", "s3": "ok", "sampler": "ok"}}
    assert probes.calls == {"redis": 1, "s3": 1, "sampler": 1}
    clock.now += 0.1  # a second after the answer: probed again
    assert get()[0].status_code == 200
    assert probes.calls == {"redis": 2, "s3": 2, "sampler": 2}


def test_the_cached_answer_keeps_the_503(serve, clock):
    probes = Probes(denoiser_ready=False)
    get = serve(probes)
    answers = [get()[0], get()[0]]
    assert [r.status_code for r in answers] == [503, 503]
    assert answers[0].json() == answers[1].json()
    assert answers[1].json()["checks"]["sampler"] == "unavailable: RuntimeError"
    assert probes.calls["sampler"] == 1
    probes.denoiser_ready = True
    clock.now += health.READY_CACHE_SECONDS
    assert get()[0].status_code == 200


def test_calls_that_arrive_while_the_checks_run_wait_for_them(serve, clock):
    """A dependency that answers slowly (up to the checks' timeout) must not let every request
    in the meantime start checks of its own."""
    probes = Probes(delay=0.2)
    get = serve(probes)
    answers = get(20)
    assert {r.status_code for r in answers} == {200}
    assert probes.calls == {"redis": 1, "s3": 1, "sampler": 1}


def test_a_model_folder_that_cannot_be_served_is_skipped_and_named(serve, clock, tmp_path, caplog):
    """Bad folders beside the demo model (a consistency model's scheduler; a latent pipeline
    whose decoder weights are truncated) beside good ones: the others serve, /readyz stays ready and names the
    skipped folder (the reason, which names files, goes to the log only)."""
    settings = Settings()
    (tmp_path / settings.default_model).symlink_to(Path(settings.model_dir).resolve() / settings.default_model)
    bad = tmp_path / "consistency"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 32}))
    (bad / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    (bad / "scheduler_config.json").write_text(json.dumps({"_class_name": "CMStochasticIterativeScheduler"}))
    # a latent pipeline whose vae/ weights are cut short, beside a whole one
    from tests.core.test_latent_models import _ldm

    _ldm(tmp_path / "faces")
    _ldm(tmp_path / "broken-vae")
    weights = tmp_path / "broken-vae" / "vqvae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with caplog.at_level("WARNING", logger="ray.serve"):
        registry = ModelRegistry(tmp_path, settings.default_model)
    assert sorted(registry.models) == ["faces", settings.default_model]
    assert "CMStochasticIterativeScheduler" in registry.skipped["consistency"]
    assert "vqvae/diffusion_pytorch_model.safetensors: truncated" in registry.skipped["broken-vae"]
    assert any("model consistency skipped" in r.getMessage() for r in caplog.records)
    answer = serve(Probes(), registry)()[0]
    assert answer.status_code == 200
    assert answer.json()["skipped_models"] == ["broken-vae", "consistency"]
    assert "CMStochastic" not in answer.text


def test_a_default_model_that_cannot_be_served_stops_the_service_with_the_reason(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="default model 'm' .* cannot be served: .*not valid JSON"):
        ModelRegistry(tmp_path, "m")
