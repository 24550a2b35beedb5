"""A shard whose sampling never returns is given up after shard_timeout_seconds and retried, and
its job fails once the attempts are spent. The consumer runs in-process against the real Redis
(its own database, so the stack's workers do not see it) with a Denoiser that hangs."""

from __future__ import annotations

import asyncio

import pytest

from service.jobs.schemas import JobParams, JobStatus, ShardResult, ShardTask
from service.jobs.store import JobStore
from service.settings import Settings
from service.storage import ObjectStore
from service.worker.consumer import Consumer

pytestmark = pytest.mark.integration


def test_hung_sampler_times_out_then_fails_the_job(stack):
    settings = Settings(
        **{
            **stack.settings.model_dump(),
            "s3_secret_access_key": stack.settings.s3_secret_access_key.get_secret_value(),
            "redis_url": stack.redis.url.rsplit("/", 1)[0] + "/3",
            "shard_timeout_seconds": 0.3,
            "max_attempts": 2,
        }
    )
    calls: list[int] = []

    async def hung_sampler(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def scenario() -> tuple[JobStatus, str]:
        store = JobStore.from_url(settings.redis_url, 600, settings.shard_size)
        await store.r.flushdb()
        params = JobParams(
            model="mnist", num_images=1, steps=2, sampler="ddim", eta=0.0, seed=0, class_label=1, guidance_scale=1.0
        )
        job_id, _, _ = await store.submit("tester", params, {"n": 1})
        consumer = Consumer(settings, store, ObjectStore(settings), hung_sampler, name="timeout-test")
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
        await store.r.flushdb()
        await store.close()
        return record.status, record.error.message if record.error else ""

    status, message = asyncio.run(scenario())
    assert status == JobStatus.failed
    assert "timed out after 0.3 s" in message
    assert calls == [1, 2]
