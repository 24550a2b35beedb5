"""GET /v1/jobs/{id}/archive and the manifest: through the real Ray Serve stack, the ZIP holds
the bucket's bytes and the manifest vouches for them; unit checks of the manifest need no
server."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import zipfile

import httpx
import pytest

from service.archive import build_manifest
from service.jobs.records import JobParams, JobStatus
from service.jobs.store import JobRecord
from service.storage import ObjectStore, manifest_key
from tests.service.conftest import KEY_CAROL_OLD, wait_for_status

P = JobParams(
    model="mnist", num_images=2, steps=4, sampler="ddim", eta=0.0, seed=9, class_label=[3, 4], guidance_scale=1.0
)


def record(**changes) -> JobRecord:
    fields = dict(
        id="ab" * 16, owner="alice", status=JobStatus.succeeded, params=P, created_at=1.5, started_at=2.0,
        finished_at=3.0, error=None, num_shards=1, shard_size=4, images_done=2, shard_steps={0: 4}, done_shards={0},
    )  # fmt: skip
    return JobRecord(**{**fields, **changes})


def test_the_manifest_lists_parameters_and_every_image():
    manifest = json.loads(build_manifest(record(), {1: ("b" * 64, 20), 0: ("a" * 64, 10)}))
    assert manifest == {
        "job_id": "ab" * 16,
        "created_at": 1.5,
        "model": "mnist",
        "params": P.model_dump(mode="json"),
        "images": [
            {"index": 0, "seed": 9, "key": f"jobs/{'ab' * 16}/00000.png", "sha256": "a" * 64, "size": 10},
            {"index": 1, "seed": 9, "key": f"jobs/{'ab' * 16}/00001.png", "sha256": "b" * 64, "size": 20},
        ],
    }
    assert manifest["params"]["class_label"] == [3, 4] and manifest["params"]["sampler"] == "ddim"
    with pytest.raises(ValueError, match=r"no checksum for images \[1\]"):
        build_manifest(record(), {0: ("a" * 64, 10)})


@pytest.mark.integration
def test_the_archive_holds_the_buckets_images_and_a_manifest_that_matches_them(api, stack):
    job = api.post("/v1/jobs", json={"num_images": 5, "steps": 4, "class_label": 8, "seed": 21}).json()
    done = wait_for_status(api, job["id"], {"succeeded", "failed"})
    assert done["status"] == "succeeded", done
    s3 = ObjectStore(stack.settings.storage)
    stored_manifest = s3.get_bytes(manifest_key(job["id"]))
    assert stored_manifest is not None and httpx.get(done["manifest_url"], timeout=10).content == stored_manifest

    with api.stream("GET", f"/v1/jobs/{job['id']}/archive") as r:
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/zip"
        assert r.headers["content-disposition"] == f'attachment; filename="{job["id"]}.zip"'
        body = r.read()
    assert int(r.headers["content-length"]) == len(body)
    with zipfile.ZipFile(io.BytesIO(body)) as z:
        assert z.testzip() is None
        assert z.namelist() == [f"{i:05d}.png" for i in range(5)] + ["manifest.json"]
        manifest = json.loads(z.read("manifest.json"))
        assert z.read("manifest.json") == stored_manifest
        for image in manifest["images"]:
            data = z.read(f"{image['index']:05d}.png")
            assert data == s3.get_bytes(image["key"])  # byte for byte what the bucket holds
            assert image["sha256"] == hashlib.sha256(data).hexdigest() and image["size"] == len(data)
    assert [i["index"] for i in manifest["images"]] == list(range(5))
    assert {i["seed"] for i in manifest["images"]} == {21}
    assert manifest["job_id"] == job["id"] and manifest["params"] == done["params"]
    assert manifest["created_at"] == done["created_at"] and manifest["model"] == "mnist"

    with stack.client(KEY_CAROL_OLD) as carol:
        assert carol.get(f"/v1/jobs/{job['id']}/archive").status_code == 404
    assert api.get(f"/v1/jobs/{'0' * 32}/archive").status_code == 404
    # deleting the job deletes the manifest with the images
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    left = s3.client.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=f"jobs/{job['id']}/")
    assert left.get("KeyCount", 0) == 0


@pytest.mark.integration
def test_no_archive_until_the_job_succeeds(api):
    job = api.post("/v1/jobs", json={"num_images": 16, "steps": 300, "class_label": 1}).json()
    assert job["manifest_url"] is None
    wait_for_status(api, job["id"], {"running"}, timeout=60)
    running = api.get(f"/v1/jobs/{job['id']}/archive")
    assert (
        running.status_code == 409 and running.json()["detail"] == "job is running; only a succeeded job has an archive"
    )
    assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    assert api.get(f"/v1/jobs/{job['id']}/archive").status_code == 409
    assert api.get(f"/v1/jobs/{job['id']}").json()["manifest_url"] is None


@pytest.mark.integration
def test_the_archive_is_503_while_s3_is_unreachable_and_404_once_the_bucket_lost_the_manifest(asgi_api, stack):
    """A succeeded job (its shards completed in database 6, which no Worker reads): with S3
    unreachable the archive answers 503; with S3 back it streams the images and the manifest
    the completing Worker wrote; with the manifest removed from the bucket it answers 404 and
    says so, rather than inventing a manifest."""
    from service.archive import write_manifest
    from service.jobs.store import JobStore
    from service.storage import image_key

    client = asgi_api()
    job_id = client.post("/v1/jobs", json={"num_images": 2, "steps": 2, "class_label": 0}).json()["id"]
    s3 = ObjectStore(stack.settings.storage)
    pngs = [b"\x89PNG first", b"\x89PNG second!"]
    for i, data in enumerate(pngs):
        s3.put_image(image_key(job_id, i), data)
    files = {i: (hashlib.sha256(d).hexdigest(), len(d)) for i, d in enumerate(pngs)}

    async def succeed() -> None:
        from service.jobs.records import ShardTask

        store = JobStore.from_url(stack.redis.url.rsplit("/", 1)[0] + "/6", 600, stack.settings.shard_size)
        rec = await store.get(job_id)
        task = ShardTask(job_id=job_id, shard=0, start=0, count=2, params=rec.params)
        assert await store.complete_shard(task) == ("queued", True)
        write_manifest(s3, rec, files)  # as the completing Worker does, before the job succeeds
        assert await store.succeed(job_id, rec.owner)
        await store.close()

    asyncio.run(succeed())
    away = asgi_api(s3_endpoint_url="http://127.0.0.1:9", s3_max_attempts=1)
    down = away.get(f"/v1/jobs/{job_id}/archive")
    assert down.status_code == 503 and "object storage" in down.json()["detail"]

    back = asgi_api()
    r = back.get(f"/v1/jobs/{job_id}/archive")
    assert r.status_code == 200
    with zipfile.ZipFile(io.BytesIO(r.content)) as z:
        assert [z.read(f"{i:05d}.png") for i in range(2)] == pngs
        manifest = json.loads(z.read("manifest.json"))
    assert [(i["sha256"], i["size"]) for i in manifest["images"]] == [files[0], files[1]]

    s3.delete_job(job_id)
    gone = back.get(f"/v1/jobs/{job_id}/archive")
    assert gone.status_code == 404 and "no longer in the bucket" in gone.json()["detail"]
