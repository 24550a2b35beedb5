"""Submit -> poll -> download against the real stack."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from tests.service.conftest import KEY_CAROL_OLD, wait_for_status, wait_idle

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


def test_idempotency_key_returns_the_same_job_and_rejects_another_body(api):
    body = {"num_images": 1, "steps": 3, "class_label": 1}
    first = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    again = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["params"]["seed"] == first.json()["params"]["seed"]  # the chosen seed is kept
    other = api.post("/v1/jobs", json={**body, "steps": 4}, headers={"Idempotency-Key": "abc-1"})
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]
    fresh = api.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-2"})
    assert fresh.status_code == 202 and fresh.json()["id"] != first.json()["id"]
    for job_id in (first.json()["id"], fresh.json()["id"]):
        assert wait_for_status(api, job_id, {"succeeded"})["status"] == "succeeded"


def test_seed_is_chosen_when_absent_and_images_are_reproducible(api, stack):
    """The same seed gives the same bytes: here two jobs each run alone; beside other jobs, the
    next test."""
    wait_idle(stack)
    r = api.post("/v1/jobs", json={"num_images": 2, "steps": 4, "class_label": [4, 5]})
    assert r.status_code == 202
    seed = r.json()["params"]["seed"]
    assert isinstance(seed, int) and seed >= 0
    a = wait_for_status(api, r.json()["id"], {"succeeded"})
    wait_idle(stack)
    again = api.post("/v1/jobs", json={"num_images": 2, "steps": 4, "class_label": [4, 5], "seed": seed})
    b = wait_for_status(api, again.json()["id"], {"succeeded"})
    assert _image_bytes(stack, a) == _image_bytes(stack, b)


def _image_bytes(stack, job: dict) -> list[bytes]:
    from service.storage import ObjectStore

    s3 = ObjectStore(stack.settings.storage).client
    return [
        s3.get_object(Bucket=stack.settings.s3_bucket, Key=r["key"])["Body"].read()
        for r in sorted(job["results"], key=lambda r: r["index"])
    ]


def test_a_seed_gives_the_same_bytes_alone_and_beside_other_jobs(api, stack):
    """Batch-invariant images (UNDIFFUSE_INVARIANT_ROWS, on by default on a CPU): a guided job run
    alone, then again while another owner's larger job runs (their rows share the Denoiser's
    steps), stores the same PNG bytes."""
    wait_idle(stack)
    params = {"num_images": 3, "steps": 15, "class_label": [4, 5, 6], "guidance_scale": 3.0, "seed": 1234}
    alone = wait_for_status(api, api.post("/v1/jobs", json=params).json()["id"], {"succeeded"})
    wait_idle(stack)
    with stack.client(KEY_CAROL_OLD) as carol:
        big = carol.post("/v1/jobs", json={"num_images": 16, "steps": 40, "class_label": 1, "seed": 99})
        assert big.status_code == 202, big.text
        wait_for_status(carol, big.json()["id"], {"running", "succeeded"})
        beside = wait_for_status(api, api.post("/v1/jobs", json=params).json()["id"], {"succeeded"})
        big_job = wait_for_status(carol, big.json()["id"], {"succeeded"})
    assert big_job["started_at"] < beside["finished_at"] <= big_job["finished_at"]  # it ran beside the big job
    assert _image_bytes(stack, beside) == _image_bytes(stack, alone)


def test_list_jobs_newest_first_with_status_filter_and_cursor(stack):
    with stack.client("test-key-lister") as anon:
        assert anon.get("/v1/jobs").status_code == 401  # not a configured key
    with stack.client() as api:
        ids = [
            api.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 0}).json()["id"] for _ in range(3)
        ]
        for job_id in ids:
            wait_for_status(api, job_id, {"succeeded"})
        page1 = api.get("/v1/jobs", params={"limit": 2}).json()
        assert [j["id"] for j in page1["jobs"]] == ids[::-1][:2]
        page2 = api.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
        assert page2["jobs"][0]["id"] == ids[0]
        succeeded = api.get("/v1/jobs", params={"status": "succeeded", "limit": 100}).json()["jobs"]
        assert {j["status"] for j in succeeded} == {"succeeded"} and set(ids) <= {j["id"] for j in succeeded}
        assert api.get("/v1/jobs", params={"status": "bogus"}).status_code == 422


def test_models_health_and_readiness(api, stack):
    models = api.get("/v1/models").json()["models"]
    assert [m["name"] for m in models] == ["faces", "mnist"]  # the stack's model_dir (tests/service/conftest.py)
    assert [m["name"] for m in models if m["default"]] == ["mnist"]
    mnist = next(m for m in models if m["name"] == "mnist")
    assert mnist == {**mnist, "image_size": 28, "channels": 1, "num_classes": 10, "default": True}
    assert (mnist["num_timesteps"], mnist["max_steps"]) == (1000, min(1000, stack.settings.max_steps))
    assert mnist["guidance_interval"] == [0.28, 5.42]
    assert httpx.get(f"{stack.base_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.base_url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["checks"] == {"redis": "ok", "s3": "ok", "sampler": "ok"}
    openapi = httpx.get(f"{stack.base_url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel", "/v1/models"} <= set(openapi["paths"])
