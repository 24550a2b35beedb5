"""Redis and S3 going away: the Worker's shared run loop backs off and stops, a shard whose
images are done waits an outage out for the patience and then spends an attempt (it is never
dropped), and DELETE keeps a job's record while S3 is away."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from service.jobs.lifecycle import JobLifecycle
from service.jobs.records import JobStatus, ShardResult, ShardTask
from service.jobs.store import JobRecord
from service.settings import Settings
from service.storage import ObjectStore
from tests.service.conftest import S3_KEY, S3_SECRET
from tests.service.test_consumer_errors import _run_until_ended as run_consumer_until_ended
from tests.service.test_consumer_errors import _settings
from worker.loop import run_until_stopped


# --- the run loop ------------------------------------------------------------------------------
def test_the_run_loop_backs_off_while_a_dependency_is_away_and_resets_when_it_returns(caplog):
    """Rounds that fail with a dependency error are retried after 0.1, 0.2, 0.4, 0.4 s (doubling
    up to the cap); the first round that succeeds resets the backoff."""
    calls: list[float] = []
    stopping = asyncio.Event()

    async def round_() -> float:
        calls.append(time.monotonic())
        if len(calls) <= 4 or len(calls) == 6:
            raise RedisConnectionError("Connection refused")
        if len(calls) == 7:
            stopping.set()
        return 0.0

    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        asyncio.run(run_until_stopped("test", round_, stopping, backoff=(0.1, 0.4)))
    waits = [r.getMessage().rsplit("retrying in ", 1)[1] for r in caplog.records if "retrying in" in r.getMessage()]
    assert waits == ["0.1 s", "0.2 s", "0.4 s", "0.4 s", "0.1 s"]  # round 5 succeeded: round 6 waits 0.1 s again
    assert len(calls) == 7
    gaps = [b - a for a, b in zip(calls, calls[1:], strict=False)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2 and gaps[2] >= 0.4 and gaps[3] >= 0.4
    assert 0.1 <= gaps[5] < 0.4


def test_the_run_loop_survives_an_unexpected_error_and_stops_when_told_even_mid_wait(caplog):
    calls: list[str] = []
    stopping = asyncio.Event()

    async def round_() -> float:
        calls.append("round")
        if len(calls) == 1:
            raise ValueError("a bug")
        return 3600.0  # a long wait, cut short by the stop

    async def scenario() -> float:
        loop = asyncio.create_task(run_until_stopped("test", round_, stopping, error_wait=0.01))
        while len(calls) < 2:
            await asyncio.sleep(0.01)
        stopped_at = time.monotonic()
        stopping.set()
        await asyncio.wait_for(loop, 5)
        return time.monotonic() - stopped_at

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        took = asyncio.run(scenario())
    assert calls == ["round", "round"] and took < 1.0
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [ValueError]


def test_the_run_loop_goes_on_at_once_when_woken():
    stopping, wake = asyncio.Event(), asyncio.Event()
    calls: list[float] = []

    async def round_() -> float:
        calls.append(time.monotonic())
        if len(calls) == 3:
            stopping.set()
        return 3600.0

    async def scenario() -> None:
        loop = asyncio.create_task(run_until_stopped("test", round_, stopping, wake=wake))
        for expected in (2, 3):
            await asyncio.sleep(0.05)
            wake.set()
            while len(calls) < expected:
                await asyncio.sleep(0.01)
        await asyncio.wait_for(loop, 5)

    asyncio.run(scenario())
    assert len(calls) == 3


# --- a shard's images waiting out an outage ----------------------------------------------------
def _pixels(task: ShardTask) -> ShardResult:
    image = np.full((task.count, 28, 28, 1), 128, dtype=np.uint8)
    return ShardResult(job_id=task.job_id, shard=task.shard, pixels=image.tobytes(), shape=image.shape)


def _run_until_ended(
    settings: Settings, generate, lifecycle=None, seconds: float = 60
) -> tuple[JobRecord | None, list, list[str]]:
    """Submit a 1-image job and run a consumer until it ends; (record, dead letters, the keys of
    its objects in the bucket)."""
    record, dead = run_consumer_until_ended(settings, generate, seconds=seconds, lifecycle=lifecycle)
    listed = ObjectStore(settings.storage).client.list_objects_v2(
        Bucket=settings.s3_bucket, Prefix=f"jobs/{record.id}/"
    )
    return record, dead, [o["Key"] for o in listed.get("Contents", [])]


@contextmanager
def _away_during_the_first_attempt(server, seconds: float):
    """Yields (generate, calls): a Denoiser stand-in that stops `server` while the first attempt
    "samples" and starts it again `seconds` later; later attempts just sample. The restart is
    joined on exit, so the server is back before its own `with` stops it."""
    calls: list[int] = []
    restart = threading.Timer(seconds, server.start)

    async def generate(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        if len(calls) == 1:
            await asyncio.to_thread(server.stop)
            restart.start()
        return _pixels(task)

    try:
        yield generate, calls
    finally:
        if restart.ident is not None:
            restart.join()


@pytest.mark.integration
def test_an_s3_outage_longer_than_the_patience_spends_an_attempt_and_the_shard_is_retried(stack, tmp_path):
    """S3 goes away while the first attempt samples and stays away past the patience (1 s): that
    attempt gives up its images and the shard goes back as its next attempt, and again while S3
    is still away; once it is back, an attempt stores the images and the job succeeds. The shard
    is never dropped, and each retry counts one attempt more."""
    from service.dev.servers import S3Server

    with S3Server(tmp_path / "s3", access_key=S3_KEY, secret_key=S3_SECRET).start() as s3:
        settings = _settings(
            stack,
            5,
            s3_endpoint_url=s3.endpoint,
            s3_bucket="outage",
            s3_max_attempts=1,
            dependency_patience_seconds=1.0,
            max_attempts=20,
        )
        ObjectStore(settings.storage).ensure_bucket()
        with _away_during_the_first_attempt(s3, 3.0) as (generate, calls):
            record, dead, keys = _run_until_ended(settings, generate, seconds=120)
    assert record.status == JobStatus.succeeded, record
    assert len(calls) >= 2 and calls == list(range(1, len(calls) + 1)), calls  # 1, 2, ...: one attempt each
    assert dead == []
    assert keys == [f"jobs/{record.id}/00000.png", f"jobs/{record.id}/manifest.json"]


@pytest.mark.integration
def test_a_redis_outage_longer_than_the_patience_spends_an_attempt_and_the_shard_is_retried(stack):
    """Redis refuses the first attempt's completion for longer than the patience (1 s): the
    attempt gives up and the shard goes back as attempt 2 (not dropped, not left to its lease),
    which completes it."""
    settings = _settings(stack, 3, dependency_patience_seconds=1.0)
    refused: list[float] = []
    calls: list[int] = []

    class RedisAwayForTheFirstCompletion(JobLifecycle):
        async def complete_shard(self, task, record, files=None):
            if task.attempt == 1:
                refused.append(time.monotonic())
                raise RedisConnectionError("Error 111 connecting to redis:6379. Connection refused.")
            return await super().complete_shard(task, record, files)

    async def generate(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        return _pixels(task)

    record, dead, keys = _run_until_ended(settings, generate, lifecycle=RedisAwayForTheFirstCompletion)
    assert record.status == JobStatus.succeeded and record.images_done == 1
    assert calls == [1, 2] and dead == []
    assert len(refused) >= 2 and refused[-1] - refused[0] <= 1.0  # waited, within the patience
    assert keys == [f"jobs/{record.id}/00000.png", f"jobs/{record.id}/manifest.json"]


# --- DELETE while S3 is away -------------------------------------------------------------------
@pytest.mark.integration
def test_delete_answers_503_and_keeps_the_record_while_s3_is_away(asgi_api):
    """A finished job's DELETE deletes its images first: with S3 away it answers 503 and the job
    stays, listed and readable; once S3 is back the same DELETE removes it."""
    from service.dev.servers import free_port

    api = asgi_api()
    job_id = api.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 1}).json()["id"]
    assert api.post(f"/v1/jobs/{job_id}/cancel").json()["status"] == "canceled"

    away = asgi_api(s3_endpoint_url=f"http://127.0.0.1:{free_port()}", s3_max_attempts=1)
    r = away.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 503 and "Retry-After" in r.headers
    r = away.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    assert job_id in [job["id"] for job in away.get("/v1/jobs").json()["jobs"]]

    back = asgi_api()
    assert back.delete(f"/v1/jobs/{job_id}").status_code == 204
    assert back.get(f"/v1/jobs/{job_id}").status_code == 404
