"""Per-key quotas (429 + Retry-After) and the lifetime of results: DELETE, the sweeper, failed
and canceled jobs. Against the real Redis, S3-compatible server and (for DELETE) Serve stack."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest

from service.jobs.store import JobStore
from service.storage import ObjectStore, image_key
from tests.service.conftest import KEY_B, wait_for_status
from undiffuse.images import png_bytes
from worker.sweeper import Sweeper

pytestmark = pytest.mark.integration
JOB = {"num_images": 1, "class_label": 2, "steps": 2}


def test_submissions_beyond_the_per_minute_rate_get_429_with_retry_after(asgi_api):
    client = asgi_api(max_submissions_per_minute_per_key=3)
    assert [client.post("/v1/jobs", json=JOB).status_code for _ in range(3)] == [202, 202, 202]
    refused = client.post("/v1/jobs", json=JOB)
    assert refused.status_code == 429 and "per minute" in refused.json()["detail"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    other = client.post("/v1/jobs", json=JOB, headers={"Authorization": f"Bearer {KEY_B}"})
    assert other.status_code == 202  # each key has its own window


def test_jobs_in_flight_beyond_the_limit_get_429_until_one_ends(asgi_api):
    client = asgi_api(max_jobs_in_flight_per_key=2)
    first = client.post("/v1/jobs", json=JOB).json()["id"]
    assert client.post("/v1/jobs", json=JOB).status_code == 202
    refused = client.post("/v1/jobs", json=JOB)
    assert refused.status_code == 429 and "queued or running" in refused.json()["detail"]
    assert int(refused.headers["Retry-After"]) >= 1
    assert client.post(f"/v1/jobs/{first}/cancel").status_code == 200
    assert client.post("/v1/jobs", json=JOB).status_code == 202


def test_a_malformed_list_cursor_is_422_naming_it(asgi_api):
    client = asgi_api()
    answer = client.get("/v1/jobs", params={"cursor": "12345"})  # the old bare-score format
    assert answer.status_code == 422 and answer.json()["detail"][0]["loc"] == ["query", "cursor"]


def test_delete_removes_a_finished_jobs_images_and_record(stack, api):
    job = api.post("/v1/jobs", json={**JOB, "num_images": 3}).json()
    done = wait_for_status(api, job["id"], {"succeeded"})
    old_url = done["results"][0]["url"]
    assert httpx.get(old_url).status_code == 200
    with stack.client(KEY_B) as bob:
        assert bob.delete(f"/v1/jobs/{job['id']}").status_code == 404  # not Bob's to delete
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert api.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [j["id"] for j in api.get("/v1/jobs").json()["jobs"]]
    objects = ObjectStore(stack.settings.storage).client.list_objects_v2(
        Bucket=stack.settings.s3_bucket, Prefix=f"jobs/{job['id']}/"
    )
    assert objects.get("KeyCount", 0) == 0
    assert httpx.get(old_url).status_code == 404  # an old presigned URL leads nowhere now


def test_an_active_job_cannot_be_deleted_and_a_canceled_one_lists_no_results(stack, api):
    job = api.post("/v1/jobs", json={**JOB, "num_images": 16, "steps": 400}).json()
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 409
    canceled = api.post(f"/v1/jobs/{job['id']}/cancel").json()
    assert canceled["status"] == "canceled" and canceled["results"] == []
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204


def test_large_results_are_paginated(asgi_api, stack):
    """A succeeded job's results come in pages of results_limit with results_next_offset."""
    client = asgi_api()
    job_id = client.post("/v1/jobs", json={**JOB, "num_images": 10}).json()["id"]

    async def finish() -> None:  # complete its shards as a worker would (no worker reads db 6)
        store = JobStore.from_url(stack.redis.url.rsplit("/", 1)[0] + "/6", 600, stack.settings.shard_size)
        record = await store.get(job_id)
        from service.jobs.records import ShardTask

        for k in range(record.num_shards):
            start, count = record.shard_range(k)
            task = ShardTask(job_id=job_id, shard=k, start=start, count=count, params=record.params)
            await store.complete_shard(task)
        await store.succeed(job_id, record.owner)
        await store.close()

    asyncio.run(finish())
    seen, offset = [], 0
    while offset is not None:
        page = client.get(f"/v1/jobs/{job_id}", params={"results_offset": offset, "results_limit": 4}).json()
        assert len(page["results"]) <= 4
        seen += [r["index"] for r in page["results"]]
        offset = page["results_next_offset"]
    assert seen == list(range(10))


def test_the_sweeper_deletes_the_images_of_due_jobs_only(stack):
    objects = ObjectStore(stack.settings.storage)
    pixels = png_bytes(np.zeros((28, 28, 1), dtype=np.uint8))

    async def scenario() -> tuple[int, list[str]]:
        store = JobStore.from_url(stack.redis.url.rsplit("/", 1)[0] + "/5", 600, 4)
        await store.r.flushdb()
        for job_id in ("a" * 32, "b" * 32):
            for index in range(3):
                await asyncio.to_thread(objects.put_image, image_key(job_id, index), pixels)
        await store.purges.schedule("a" * 32, time.time() - 1)  # due
        await store.purges.schedule("b" * 32, time.time() + 3600)  # not yet
        swept = await Sweeper(store, objects).sweep_once()
        left = [job_id for job_id, _ in await store.purges.due(time.time() + 7200, 10)]
        await store.r.flushdb()
        await store.close()
        return swept, left

    swept, left = asyncio.run(scenario())
    assert swept == 1 and left == ["b" * 32]

    def count(job_id: str) -> int:
        reply = objects.client.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=f"jobs/{job_id}/")
        return reply.get("KeyCount", 0)

    assert count("a" * 32) == 0 and count("b" * 32) == 3
    objects.delete_job("b" * 32)


def test_submissions_right_after_a_redis_restart_are_accepted_not_503(asgi_api, redis_server):
    """Regression (drills): the rate limiter's pooled connections died with Redis and each
    failed once afterwards, a burst of 503s after every restart. Both clients reconnect."""
    client = asgi_api(max_submissions_per_minute_per_key=1000)
    assert [client.post("/v1/jobs", json=JOB).status_code for _ in range(4)] == [202] * 4
    redis_server.stop()
    redis_server.start()
    assert [client.post("/v1/jobs", json=JOB).status_code for _ in range(4)] == [202] * 4


def test_one_undeletable_job_does_not_stop_the_sweeper(stack):
    """A job whose objects cannot be deleted (access denied, object lock) is retried later;
    the jobs after it are still swept."""
    from botocore.exceptions import ClientError

    from worker.sweeper import RETRY_S

    class Refusing(ObjectStore):
        def delete_job(self, job_id: str) -> int:
            if job_id == "c" * 32:
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": "no"}}, "DeleteObjects")
            return super().delete_job(job_id)

    objects = Refusing(stack.settings.storage)
    pixels = png_bytes(np.zeros((28, 28, 1), dtype=np.uint8))
    objects.put_image(image_key("d" * 32, 0), pixels)

    async def scenario():
        store = JobStore.from_url(stack.redis.url.rsplit("/", 1)[0] + "/5", 600, 4)
        await store.r.flushdb()
        now = time.time()
        await store.purges.schedule("c" * 32, now - 2)  # first in line, and refused
        await store.purges.schedule("d" * 32, now - 1)
        swept = await Sweeper(store, objects).sweep_once(now)
        left = await store.purges.due(now + 2 * RETRY_S, 10)
        await store.r.flushdb()
        await store.close()
        return swept, left

    swept, left = asyncio.run(scenario())
    assert swept == 2 and [j for j, _ in left] == ["c" * 32] and left[0][1] >= time.time() + RETRY_S - 60
    reply = objects.client.list_objects_v2(Bucket=stack.settings.s3_bucket, Prefix=f"jobs/{'d' * 32}/")
    assert reply.get("KeyCount", 0) == 0
