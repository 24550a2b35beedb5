"""Queue semantics against the real stack: cancellation, crash recovery, retries and the
dead-letter stream, and Redis going away."""

from __future__ import annotations

import time

import httpx
import pytest
import redis as redis_lib

from service.jobs import redis_keys
from service.jobs.queue import holders as queue_holders
from service.jobs.records import ShardTask
from service.storage import ObjectStore
from tests.service.conftest import enqueue_unrunnable_job, wait_for, wait_for_status, wait_idle

pytestmark = pytest.mark.integration


def _objects(stack, job_id: str) -> list[str]:
    listed = ObjectStore(stack.settings.storage).client.list_objects_v2(
        Bucket=stack.settings.s3_bucket, Prefix=f"jobs/{job_id}/"
    )
    return sorted(o["Key"] for o in listed.get("Contents", []))


def _slow_job(api, images: int = 64) -> str:
    """A job that keeps every worker slot busy for a while (DDPM, 1000 steps)."""
    r = api.post("/v1/jobs", json={"num_images": images, "steps": 1000, "sampler": "ddpm", "class_label": 8})
    assert r.status_code == 202
    return r.json()["id"]


def test_cancel_queued_job_never_runs_and_running_job_stops(api, stack):
    blocker = _slow_job(api)
    wait_for(lambda: api.get(f"/v1/jobs/{blocker}").json()["progress"]["step"] > 0, 60, what="blocker to start")
    queued = api.post("/v1/jobs", json={"num_images": 4, "steps": 3, "class_label": 2}).json()["id"]
    r = api.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"

    # the blocker is running: after cancel its step counter stops moving
    r = api.post(f"/v1/jobs/{blocker}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    wait_idle(stack, 60)
    before = api.get(f"/v1/jobs/{blocker}").json()
    time.sleep(1.5)
    after = api.get(f"/v1/jobs/{blocker}").json()
    assert after["status"] == "canceled" and after["progress"]["step"] == before["progress"]["step"] < 1000
    assert after["progress"]["images_done"] < 64

    never = api.get(f"/v1/jobs/{queued}").json()
    assert never["status"] == "canceled" and never["started_at"] is None
    assert never["progress"]["images_done"] == 0 and never["results"] == []
    assert _objects(stack, queued) == []


def _kill_worker_holding(stack, job_id: str) -> str:
    import ray

    r = redis_lib.Redis.from_url(stack.redis.url, decode_responses=True)
    holders = {
        consumer.removeprefix("worker-") for consumer, task in queue_holders(r) if task and task.job_id == job_id
    }
    assert holders, "no worker holds a shard of the job"
    victim = sorted(holders)[0]
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if "Worker" in actor["name"] and victim in actor["name"]:
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return victim
    raise AssertionError(f"worker replica {victim} not found among Ray actors")


def test_consumer_killed_mid_shard_job_still_succeeds_with_each_image_once(api, stack):
    r = api.post("/v1/jobs", json={"num_images": 8, "steps": 300, "sampler": "ddpm", "class_label": 3})
    job_id = r.json()["id"]
    wait_for(lambda: api.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] > 0, 60, what="sampling to start")
    _kill_worker_holding(stack, job_id)
    done = wait_for_status(api, job_id, {"succeeded", "failed"}, timeout=240)
    assert done["status"] == "succeeded", done
    assert done["progress"]["images_done"] == 8  # a retried shard is not counted twice
    assert _objects(stack, job_id) == [f"jobs/{job_id}/{i:05d}.png" for i in range(8)] + [
        f"jobs/{job_id}/manifest.json"
    ]
    assert sorted(x["index"] for x in done["results"]) == list(range(8))


def test_failing_shard_is_retried_then_fails_its_job_and_goes_to_dead_letter(api, stack):
    """A shard the Denoiser cannot run (more steps than the model has, which the API would have
    refused) is tried max_attempts times, then fails the job with the reason."""

    dead_before = redis_lib.Redis.from_url(stack.redis.url).xlen(redis_keys.DEAD_LETTER_STREAM)
    job_id = enqueue_unrunnable_job(stack)
    # a good job in flight at the same time may share the Denoiser's batch: it must not fail with it
    good = api.post("/v1/jobs", json={"num_images": 4, "steps": 3, "class_label": 4}).json()["id"]
    failed = wait_for_status(api, job_id, {"failed", "succeeded"}, timeout=120)
    assert wait_for_status(api, good, {"failed", "succeeded"})["status"] == "succeeded"
    assert failed["status"] == "failed"
    assert failed["error"]["code"] == "shard_failed"
    # the owner is told what went wrong in words; the exception's text stays with the operator
    assert "failed 2 times: the model could not sample it" in failed["error"]["message"]
    assert "steps must be in" not in failed["error"]["message"]
    dead = redis_lib.Redis.from_url(stack.redis.url, decode_responses=True).xrange(redis_keys.DEAD_LETTER_STREAM)
    assert len(dead) == dead_before + 1 and job_id in dead[-1][1]["task"]
    assert "steps must be in" in dead[-1][1]["reason"]
    assert ShardTask.model_validate_json(dead[-1][1]["task"]).attempt == 3


def test_redis_down_gives_503_then_recovers(api, stack):
    stack.redis.stop()
    try:
        r = api.post("/v1/jobs", json={"class_label": 1, "steps": 2})
        assert r.status_code == 503 and "Redis is unreachable" in r.json()["detail"]
        assert r.headers["retry-after"] == "5"
        assert api.get(f"/v1/jobs/{'0' * 32}").status_code == 503  # a well-formed id: Redis is asked
        ready = httpx.get(f"{stack.base_url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unavailable")
    finally:
        stack.redis.start()  # same port, same AOF directory
    r = wait_for(
        lambda: (x := api.post("/v1/jobs", json={"class_label": 1, "steps": 2})).status_code == 202 and x,
        30,
        what="the API to accept jobs again",
    )
    assert wait_for_status(api, r.json()["id"], {"succeeded"}, timeout=120)["status"] == "succeeded"


def test_a_queued_job_says_where_it_stands_and_neither_figure_grows(api, stack):
    """Behind its owner's 64-image, 1,000-step job (more rows than the admission window of the
    test stack's Denoiser: 2 x 16) and a dozen more jobs whose first shards go past the window
    until its ceiling (twice the window) is reached, a job stays queued; its view says what
    will be served before it, and polls only ever count down."""
    slow = {"num_images": 4, "steps": 1000, "sampler": "ddpm", "class_label": 5}
    jobs = [_slow_job(api)] + [api.post("/v1/jobs", json=slow).json()["id"] for _ in range(12)]
    queued = api.post("/v1/jobs", json={"num_images": 4, "steps": 10, "class_label": 2}).json()["id"]
    jobs.append(queued)
    seen = []
    try:
        wait_for(lambda: api.get(f"/v1/jobs/{jobs[0]}").json()["progress"]["step"] > 0, 60, what="the load to start")
        for _ in range(8):
            view = api.get(f"/v1/jobs/{queued}").json()
            assert view["status"] == "queued", view
            seen.append(view["queue"])
            time.sleep(0.5)
    finally:
        for job_id in jobs:
            api.post(f"/v1/jobs/{job_id}/cancel")
    wait_idle(stack, 60)
    aheads = [q["ahead_row_steps"] for q in seen]
    # at least the big job's shards that wait (4 images x 1,000 steps each) are ahead of it
    assert aheads[0] >= 4 * 1000 and aheads == sorted(aheads, reverse=True)
    starts = [q["estimated_start_seconds"] for q in seen if q["estimated_start_seconds"] is not None]
    assert starts, "the Denoiser reported no throughput"
    assert starts == sorted(starts, reverse=True)
    done = api.get(f"/v1/jobs/{queued}").json()
    assert done["status"] == "canceled" and done["queue"] is None  # only a queued job has a place
