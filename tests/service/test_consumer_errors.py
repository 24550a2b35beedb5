"""Consumer error paths, in-process against the real Redis (its own database, so the stack's
workers do not see it) and the real S3-compatible server, with Denoisers that misbehave."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.api.health import _check
from service.jobs import keys
from service.jobs.schemas import JobParams, JobStatus, ShardResult, ShardTask
from service.jobs.store import JobRecord, JobStore
from service.settings import Settings
from service.storage import ObjectStore
from service.worker.consumer import Consumer

pytestmark = pytest.mark.integration
PARAMS = JobParams(
    model="mnist", num_images=1, steps=2, sampler="ddim", eta=0.0, seed=0, class_label=1, guidance_scale=1.0
)


def _settings(stack, db: int, **overrides) -> Settings:
    return Settings(
        **{
            **stack.settings.model_dump(),
            "s3_secret_access_key": stack.settings.s3_secret_access_key.get_secret_value(),
            "redis_url": stack.redis.url.rsplit("/", 1)[0] + f"/{db}",
            **overrides,
        }
    )


def _run_until_ended(settings: Settings, generate, prepare=None) -> tuple[JobRecord, list]:
    """Submit a 1-image job, let `prepare(store, job_id)` tamper with the queue, run a consumer
    until the job ends (10 s at most); returns its record and the dead-letter stream."""

    async def scenario():
        store = JobStore.from_url(settings.redis_url, 600, settings.shard_size)
        await store.r.flushdb()
        await store.queue.ensure_group()
        job_id, _, _ = await store.submit("tester", PARAMS, {"n": 1})
        if prepare is not None:
            await prepare(store, job_id)
        consumer = Consumer(settings, store, ObjectStore(settings), generate, name="errors-test")
        loop = asyncio.create_task(consumer.run())
        try:
            for _ in range(100):
                record = await store.get(job_id)
                if record.status.terminal:
                    break
                await asyncio.sleep(0.1)
        finally:
            await consumer.drain(timeout=1)
            loop.cancel()
        dead = await store.r.xrange(keys.DEAD_LETTER_STREAM)
        await store.r.flushdb()
        await store.close()
        return record, dead

    return asyncio.run(scenario())


def test_hung_sampler_times_out_then_fails_the_job(stack):
    """A shard whose sampling never returns is given up after shard_timeout_seconds and
    retried, and its job fails once the attempts are spent."""
    calls: list[int] = []

    async def hung_sampler(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    settings = _settings(stack, 3, shard_timeout_seconds=0.3, max_attempts=2)
    record, _ = _run_until_ended(settings, hung_sampler)
    assert record.status == JobStatus.failed
    assert "timed out after 0.3 s" in (record.error.message if record.error else "")
    assert calls == [1, 2]


def test_an_unparseable_shard_fails_its_job_instead_of_stranding_it(stack):
    async def never_called(task: ShardTask) -> ShardResult:
        raise AssertionError("an unreadable shard must not be sampled")

    async def break_the_shard(store: JobStore, job_id: str) -> None:
        (real,) = await store.queue.read("setup", 1, 10)  # replace the real shard by a broken one
        await store.queue.ack(real.id)
        await store.r.xadd(keys.SHARD_STREAM, {"task": json.dumps({"job_id": job_id, "shard": "zero?"})})

    record, dead = _run_until_ended(_settings(stack, 4), never_called, break_the_shard)
    assert record.status == JobStatus.failed and record.error.code == "shard_unreadable"
    assert len(dead) == 1 and dead[0][1]["reason"] == "unparseable message"


def test_readiness_details_stay_out_of_the_unauthenticated_answer():
    async def refused():
        raise ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")

    name, state = asyncio.run(_check("redis", refused))
    assert (name, state) == ("redis", "unavailable: ConnectionError")
