"""Auth isolation and every documented error, against the real stack."""

from __future__ import annotations

import pytest

from tests.service.conftest import KEY_B, KEY_CAROL_NEW, KEY_CAROL_OLD, wait_for_status

pytestmark = pytest.mark.integration


def test_auth_is_required_and_jobs_are_private(stack, api):
    with stack.client(None) as nobody:
        r = nobody.post("/v1/jobs", json={"class_label": 1, "steps": 2})
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert nobody.get("/v1/models").status_code == 401
    with stack.client("not-a-key") as wrong:
        assert wrong.get("/v1/jobs").status_code == 401
    job = api.post("/v1/jobs", json={"class_label": 1, "steps": 2}).json()
    with stack.client(KEY_B) as bob:
        assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
        assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
        assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs", params={"limit": 100}).json()["jobs"]}
        # the same Idempotency-Key is per caller: Bob's does not see Alice's job
        a = api.post("/v1/jobs", json={"class_label": 2, "steps": 2}, headers={"Idempotency-Key": "shared"})
        b = bob.post("/v1/jobs", json={"class_label": 2, "steps": 2}, headers={"Idempotency-Key": "shared"})
        assert a.status_code == b.status_code == 202 and a.json()["id"] != b.json()["id"]
        wait_for_status(bob, b.json()["id"], {"succeeded"})
    wait_for_status(api, job["id"], {"succeeded"})


@pytest.mark.parametrize(
    "body, field, fragment",
    [
        ({"class_label": 1, "steps": -3}, "steps", "greater than or equal to 1"),
        ({"class_label": 1, "steps": 1001}, "steps", "at most 1000"),
        ({"class_label": 1, "num_images": 65}, "num_images", "at most 64"),
        ({"class_label": 1, "num_images": 0}, "num_images", "greater than or equal to 1"),
        ({"class_label": 1, "model": "imagenet"}, "model", "unknown model 'imagenet'"),
        ({"class_label": 1, "sampler": "euler"}, "sampler", "'dpmpp_2m' or 'dpmpp_2m_logsnr'"),
        ({"class_label": 10}, "class_label", "out of range 0..9"),
        ({"class_label": [1, 2], "num_images": 3}, "class_label", "2 labels for 3 images"),
        ({}, "class_label", "required"),
        ({"class_label": 1, "eta": 2}, "eta", "less than or equal to 1"),
        ({"class_label": 1, "seed": -1}, "seed", "greater than or equal to 0"),
        ({"class_label": 1, "colour": "red"}, "colour", "Extra inputs are not permitted"),
    ],
)
def test_bad_requests_get_422_naming_the_field(api, body, field, fragment):
    r = api.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    errors = r.json()["detail"]
    assert any(e["loc"][-1] == field and fragment in e["msg"] for e in errors), errors


def test_malformed_json_unknown_job_and_oversized_body(api, stack):
    r = api.post("/v1/jobs", content=b'{"num_images": 2,', headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["type"] == "json_invalid"
    assert api.get("/v1/jobs/doesnotexist").status_code == 404
    assert api.post("/v1/jobs/doesnotexist/cancel").status_code == 404
    big = {"class_label": [1] * 40_000, "num_images": 40_000}
    r = api.post("/v1/jobs", json=big)
    assert r.status_code == 413 and "limit" in r.json()["detail"]


def test_cancel_finished_job_is_a_conflict(api):
    job = api.post("/v1/jobs", json={"class_label": 5, "steps": 2}).json()
    wait_for_status(api, job["id"], {"succeeded"})
    r = api.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 409 and "already succeeded" in r.json()["detail"]


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"class_label": 1, "eta": NaN}', "eta"),
        ('{"class_label": 1, "guidance_scale": Infinity}', "guidance_scale"),
        ('{"class_label": 1, "guidance_scale": -Infinity}', "guidance_scale"),
    ],
)
def test_non_finite_numbers_get_422_not_500(api, raw, field):
    r = api.post("/v1/jobs", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert any(e["loc"][-1] == field and "finite" in e["msg"] for e in r.json()["detail"]), r.text


def test_boolean_class_labels_are_refused(api):
    for label in (True, [True, 1]):
        r = api.post("/v1/jobs", json={"class_label": label, "num_images": 2 if isinstance(label, list) else 1})
        assert r.status_code == 422 and all(e["loc"][1] == "class_label" for e in r.json()["detail"]), r.text


def test_ids_that_are_not_job_ids_are_404_before_redis(api):
    job = api.post("/v1/jobs", json={"class_label": 1, "steps": 2}).json()
    for suffix in (":done", ":nope", "/../x"):
        assert api.get(f"/v1/jobs/{job['id']}{suffix}").status_code == 404  # was 500 (WRONGTYPE)
        assert api.post(f"/v1/jobs/{job['id']}{suffix}/cancel").status_code == 404
    wait_for_status(api, job["id"], {"succeeded"})


def test_bearer_scheme_is_case_insensitive_and_headers_are_bounded(stack):
    import httpx

    from tests.service.conftest import KEY_A

    with httpx.Client(base_url=stack.base_url, timeout=30) as c:
        assert c.get("/v1/models", headers={"Authorization": f"bearer {KEY_A}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": f"BEARER {KEY_A}"}).status_code == 200
        assert c.get("/v1/models", headers={"Authorization": "Bearer"}).status_code == 401
        r = c.get("/v1/models", headers={"Authorization": f"Bearer {KEY_A}", "X-Padding": "x" * 20_000})
        assert 400 <= r.status_code < 500, r.status_code


def test_a_job_over_the_cost_limit_is_refused(stack):
    """max_job_cost (262,144 image-steps) bounds what one job may take: 1,024 images x 1,000 steps
    x 2 (guided rows) is refused naming num_images; the stack's own 64-image limit would refuse it
    first, so the resolver is called with a 1,024-image limit."""
    from types import SimpleNamespace

    from fastapi.exceptions import RequestValidationError

    from service.api.params import resolve_params
    from service.api.schemas import JobCreate
    from service.models import ModelRegistry

    ctx = SimpleNamespace(
        settings=stack.settings.model_copy(update={"max_images_per_job": 1024}),
        registry=ModelRegistry(stack.settings.model_dir, stack.settings.default_model),
    )
    with pytest.raises(RequestValidationError) as err:
        resolve_params(JobCreate(num_images=1024, steps=1000, class_label=1, guidance_scale=30), ctx)
    detail = err.value.errors()[0]
    assert detail["loc"] == ("body", "num_images") and "2,048,000 image-steps" in detail["msg"]
    assert resolve_params(JobCreate(num_images=1024, steps=250, class_label=1), ctx).num_images == 1024


def test_a_rotated_key_keeps_its_owners_jobs(stack):
    """Two hashed entries of one owner: a job submitted with the old key is the new key's too,
    and nobody else's."""
    with stack.client(KEY_CAROL_OLD) as old, stack.client(KEY_CAROL_NEW) as new, stack.client(KEY_B) as bob:
        job = old.post("/v1/jobs", json={"num_images": 1, "class_label": 3, "steps": 2}).json()
        assert new.get(f"/v1/jobs/{job['id']}").status_code == 200
        assert job["id"] in [j["id"] for j in new.get("/v1/jobs").json()["jobs"]]
        assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
        wait_for_status(new, job["id"], {"succeeded"})
