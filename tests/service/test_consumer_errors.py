"""Consumer error paths, in-process against the real Redis (its own database, so the stack's
workers do not see it) and the real S3-compatible server."""

from __future__ import annotations

import asyncio
import json

import pytest

from service.api.health import _check
from service.jobs import keys
from service.jobs.schemas import JobParams, JobStatus, ShardResult, ShardTask
from service.jobs.store import JobStore
from service.settings import Settings
from service.storage import ObjectStore
from service.worker.consumer import Consumer

pytestmark = pytest.mark.integration


def _settings(stack, db: int) -> Settings:
    return Settings(
        **{
            **stack.settings.model_dump(),
            "s3_secret_access_key": stack.settings.s3_secret_access_key.get_secret_value(),
            "redis_url": stack.redis.url.rsplit("/", 1)[0] + f"/{db}",
        }
    )


def test_an_unparseable_shard_fails_its_job_instead_of_stranding_it(stack):
    settings = _settings(stack, 4)

    async def never_called(task: ShardTask) -> ShardResult:
        raise AssertionError("an unreadable shard must not be sampled")

    async def scenario():
        store = JobStore.from_url(settings.redis_url, 600, settings.shard_size)
        await store.r.flushdb()
        await store.queue.ensure_group()
        params = JobParams(
            model="mnist", num_images=1, steps=2, sampler="ddim", eta=0.0, seed=0, class_label=1, guidance_scale=1.0
        )
        job_id, _, _ = await store.submit("tester", params, {"n": 1})
        (real,) = await store.queue.read("setup", 1, 10)  # replace the real shard by a broken one
        await store.queue.ack(real.id)
        await store.r.xadd(keys.SHARD_STREAM, {"task": json.dumps({"job_id": job_id, "shard": "zero?"})})
        consumer = Consumer(settings, store, ObjectStore(settings), never_called, name="errors-test")
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

    record, dead = asyncio.run(scenario())
    assert record.status == JobStatus.failed and record.error.code == "shard_unreadable"
    assert len(dead) == 1 and dead[0][1]["reason"] == "unparseable message"


def test_readiness_details_stay_out_of_the_unauthenticated_answer():
    async def refused():
        raise ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")

    name, state = asyncio.run(_check("redis", refused))
    assert (name, state) == ("redis", "unavailable: ConnectionError")
