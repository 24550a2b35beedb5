"""A latent model (a tiny LDM pipeline saved by diffusers beside the demo model) through the
service's parts: listed and validated by the HTTP layer at its decoded size, sampled by a
Denoiser replica (no Ray) into decoded RGB images, stored as PNG and WebP of that size."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from service.denoiser import Denoiser
from service.jobs.records import JobParams, ShardTask
from service.settings import REPO_ROOT, Settings
from tests.core.test_latent_models import _ldm
from undiffuse.images import encode_image


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "mnist").symlink_to(REPO_ROOT / "models" / "mnist")
    _ldm(folder / "faces")
    return folder


def test_the_api_lists_and_validates_a_latent_model_at_its_image_size(asgi_api, model_dir):
    client = asgi_api(model_dir=model_dir)
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"mnist", "faces"}
    assert (models["faces"]["image_size"], models["faces"]["channels"]) == (16, 3)  # decoded, not latent
    ok = client.post("/v1/jobs", json={"model": "faces", "num_images": 2, "steps": 5})
    assert ok.status_code == 202, ok.text
    refused = client.post("/v1/jobs", json={"model": "faces", "num_images": 1, "steps": 5, "class_label": 1})
    assert refused.status_code == 422 and "class_label" in refused.text  # unconditional


def test_a_denoiser_replica_returns_decoded_rgb_images_for_a_latent_model(redis_server, model_dir):
    settings = Settings(model_dir=model_dir, redis_url=redis_server.url, device="cpu", compile="off", warmup_seconds=0)
    params = JobParams(
        model="faces", num_images=3, steps=4, sampler="ddim", eta=0.0, seed=7, class_label=None, guidance_scale=1.0
    )

    async def sample():
        denoiser = Denoiser.func_or_class(settings)
        try:
            return await asyncio.wait_for(
                denoiser.generate(ShardTask(job_id="f" * 32, shard=0, start=0, count=3, params=params)), 120
            )
        finally:
            denoiser.__del__()

    result = asyncio.run(sample())
    pixels = np.frombuffer(result.pixels, dtype=np.uint8).reshape(result.shape)
    assert pixels.shape == (3, 16, 16, 3)
    assert len({pixels[i].tobytes() for i in range(3)}) == 3  # three images, not one repeated
    for fmt, pillow in (("png", "PNG"), ("webp", "WEBP")):
        with Image.open(io.BytesIO(encode_image(pixels[0], fmt))) as im:
            assert (im.format, im.size, im.mode) == (pillow, (16, 16), "RGB")
