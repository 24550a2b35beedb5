"""Images in the format a job asks for: png (default), jpeg or webp with a quality, through the
API, the Worker's upload, the presigned URLs, the manifest and the archive."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import wait_for_status
from undiffuse.image_formats import DEFAULT_QUALITY, media_type_of
from undiffuse.images import encode_image


@pytest.mark.parametrize(("fmt", "pillow"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
@pytest.mark.parametrize("channels", [1, 3])
def test_images_encode_in_each_format_keeping_size_and_mode(fmt, pillow, channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(28, 28, channels), dtype=np.uint8)
    data = encode_image(image, fmt, quality=75)
    with Image.open(io.BytesIO(data)) as im:
        gray = channels == 1 and fmt != "webp"  # WebP has no grayscale mode: RGB, equal channels
        assert (im.format, im.size, im.mode) == (pillow, (28, 28), "L" if gray else "RGB")
        decoded = np.asarray(im.convert("L") if channels == 1 else im).reshape(28, 28, channels)
    if fmt == "png":
        assert np.array_equal(decoded, image)  # lossless
    smooth = np.tile(np.linspace(0, 255, 28, dtype=np.uint8)[None, :, None], (28, 1, channels))
    with Image.open(io.BytesIO(encode_image(smooth, fmt, quality=95))) as im:
        back = np.asarray(im.convert("L") if channels == 1 else im).reshape(28, 28, channels)
        assert np.abs(back.astype(int) - smooth).mean() < 4


def test_quality_changes_lossy_bytes_and_media_types_follow_suffixes():
    image = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    assert len(encode_image(image, "jpeg", 10)) < len(encode_image(image, "jpeg", 95))
    assert encode_image(image, "webp") == encode_image(image, "webp", DEFAULT_QUALITY)
    assert [media_type_of(k) for k in ("a/00000.png", "a/00000.jpg", "a/00000.webp")] == [
        "image/png",
        "image/jpeg",
        "image/webp",
    ]


def test_bad_output_settings_are_422_naming_the_field(asgi_api):
    client = asgi_api()
    body = {"num_images": 1, "steps": 2, "class_label": 0}
    for extra, field in (
        ({"output_format": "gif"}, "output_format"),
        ({"output_format": "jpeg", "output_quality": 0}, "output_quality"),
        ({"output_format": "webp", "output_quality": 101}, "output_quality"),
        ({"output_quality": 80}, "output_quality"),  # png has no quality
    ):
        r = client.post("/v1/jobs", json={**body, **extra})
        assert r.status_code == 422, (extra, r.text)
        assert field in r.text
    jpeg = client.post("/v1/jobs", json={**body, "output_format": "jpeg"})
    assert jpeg.status_code == 202
    assert (jpeg.json()["params"]["output_format"], jpeg.json()["params"]["output_quality"]) == (
        "jpeg",
        DEFAULT_QUALITY,
    )


@pytest.mark.integration
def test_a_webp_job_is_stored_served_listed_and_archived_as_webp(api):
    r = api.post(
        "/v1/jobs",
        json={"num_images": 3, "steps": 4, "class_label": 2, "output_format": "webp", "output_quality": 80},
    )
    assert r.status_code == 202, r.text
    job = wait_for_status(api, r.json()["id"], {"succeeded", "failed"})
    assert job["status"] == "succeeded", job
    for res in job["results"]:
        assert res["key"] == f"jobs/{job['id']}/{res['index']:05d}.webp"
        got = httpx.get(res["url"], timeout=10)
        assert got.status_code == 200 and got.headers["content-type"] == "image/webp"
        with Image.open(io.BytesIO(got.content)) as im:
            assert (im.format, im.size) == ("WEBP", (28, 28))  # the demo's grayscale digits, as RGB in WebP
    archive = api.get(f"/v1/jobs/{job['id']}/archive")
    assert archive.status_code == 200
    with zipfile.ZipFile(io.BytesIO(archive.content)) as z:
        assert sorted(z.namelist()) == ["00000.webp", "00001.webp", "00002.webp", "manifest.json"]
        manifest = json.loads(z.read("manifest.json"))
    assert manifest["params"]["output_format"] == "webp" and manifest["params"]["output_quality"] == 80
    assert [i["key"].rsplit(".", 1)[1] for i in manifest["images"]] == ["webp"] * 3
