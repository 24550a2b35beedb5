"""A latent model (`faces`, the tiny LDM pipeline saved by diffusers beside the demo model in the
model_dir fixture) through the service's parts: listed and validated by the HTTP layer at its
decoded size, sampled by a Denoiser replica (no Ray) into decoded RGB images, stored as PNG and
WebP of that size; and through the deployed stack over HTTP, submitted to stored images."""

from __future__ import annotations

import asyncio
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from service.denoiser import Denoiser
from service.jobs.records import JobParams, ShardTask
from service.settings import REPO_ROOT, Settings
from tests.service.conftest import wait_for_status
from undiffuse.images import encode_image


def test_the_api_lists_and_validates_a_latent_model_at_its_image_size(asgi_api):
    client = asgi_api()  # the stack's settings: its model_dir
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert set(models) == {"mnist", "faces"}
    assert models["mnist"]["default"] and not models["faces"]["default"]
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


@pytest.mark.integration
def test_a_latent_model_job_through_the_stack_stores_decoded_rgb_images(api):
    """Submitted over HTTP to the deployed stack, sampled by a Denoiser replica, uploaded by a
    Worker: each image, fetched through its presigned URL, is the model's decoded 16x16 RGB, in
    the format the job asked for."""
    jobs = {
        fmt: api.post("/v1/jobs", json={"model": "faces", "num_images": 3, "steps": 6, "seed": 5, "output_format": fmt})
        for fmt in ("png", "webp")
    }
    for fmt, r in jobs.items():
        assert r.status_code == 202, r.text
        params = r.json()["params"]
        assert (params["model"], params["class_label"], params["output_format"]) == ("faces", None, fmt)
    for fmt, pillow, suffix in (("png", "PNG", "png"), ("webp", "WEBP", "webp")):
        job_id = jobs[fmt].json()["id"]
        done = wait_for_status(api, job_id, {"succeeded", "failed", "canceled"})
        assert done["status"] == "succeeded", done
        assert done["progress"] == {"images_done": 3, "images_total": 3, "step": 6, "steps": 6}
        pixels = []
        for res in sorted(done["results"], key=lambda r: r["index"]):
            assert res["key"] == f"jobs/{job_id}/{res['index']:05d}.{suffix}"
            got = httpx.get(res["url"], timeout=10)
            assert got.status_code == 200 and got.headers["content-type"] == f"image/{suffix}"
            with Image.open(io.BytesIO(got.content)) as im:
                assert (im.format, im.size, im.mode) == (pillow, (16, 16), "RGB")
                pixels.append(np.asarray(im))
        assert len(pixels) == 3
        assert len({p.tobytes() for p in pixels}) == 3  # three images, not one repeated


def test_guidance_is_refused_for_a_model_without_an_unconditional_class(asgi_api, tmp_path):
    """A class-conditional diffusers UNet2DModel has no "no class" input: a guided job is a 422
    naming guidance_scale, an unguided one is accepted."""
    from tests.core.test_invariance import _labelled_unet

    (tmp_path / "mnist").symlink_to(REPO_ROOT / "models" / "mnist")
    _labelled_unet(tmp_path / "labels")
    client = asgi_api(model_dir=tmp_path)
    body = {"model": "labels", "num_images": 2, "steps": 3, "class_label": [0, 2]}
    refused = client.post("/v1/jobs", json={**body, "guidance_scale": 2.0})
    assert refused.status_code == 422, refused.text
    assert refused.json()["detail"][0]["loc"][-1] == "guidance_scale" and "unconditional class" in refused.text
    assert client.post("/v1/jobs", json=body).status_code == 202
    assert client.post("/v1/jobs", json={**body, "model": "mnist", "guidance_scale": 2.0}).status_code == 202
