"""Submit -> poll -> download against the real stack."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from tests.service.conftest import wait_for_status

pytestmark = pytest.mark.integration


def test_submit_poll_download(api):
    r = api.post("/v1/jobs", json={"num_images": 6, "steps": 5, "class_label": 3, "seed": 11})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["params"]["seed"] == 11
    assert r.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_for_status(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    assert done["progress"] == {"images_done": 6, "images_total": 6, "step": 5, "steps": 5}
    assert sorted(res["index"] for res in done["results"]) == list(range(6))
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]
    for res in done["results"]:
        assert res["key"] == f"jobs/{job['id']}/{res['index']:05d}.png"
        png = httpx.get(res["url"], timeout=10)
        assert png.status_code == 200
        with Image.open(io.BytesIO(png.content)) as im:
            assert im.format == "PNG" and im.size == (28, 28) and im.mode == "L"
