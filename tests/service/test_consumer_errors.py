"""Consumer error paths, in-process against the real Redis (its own database, so the stack's
workers do not see it) and the real S3-compatible server, with Denoisers that misbehave."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from redis.exceptions import RedisError

from service.api.health import _check
from service.jobs import redis_keys
from service.jobs.records import JobParams, JobStatus, ShardResult, ShardTask
from service.jobs.store import JobRecord, JobStore
from service.settings import Settings
from service.storage import ObjectStore
from tests.service.conftest import S3_KEY, S3_SECRET
from worker.consumer import Consumer, ReplicaLost

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


FAR = 2**62  # a lease deadline that never passes


def _run_until_ended(
    settings: Settings, generate, prepare=None, seconds: float = 10, params: JobParams = PARAMS, lifecycle=None
) -> tuple[JobRecord, list]:
    """Submit a 1-image job, let `prepare(store, job_id)` tamper with the queue, run a consumer
    (with `lifecycle(store)` if given) until the job ends (`seconds` at most; Redis may be away
    meanwhile); returns its record and the dead-letter stream."""

    async def scenario():
        store = JobStore.from_settings(settings)
        await store.r.flushdb()
        job_id, _, _ = await store.submit("tester", params, {"n": params.num_images})
        if prepare is not None:
            await prepare(store, job_id)
        consumer = Consumer(
            settings.queue,
            store,
            ObjectStore(settings.storage),
            generate,
            name="errors-test",
            lifecycle=lifecycle and lifecycle(store),
        )
        loop = asyncio.create_task(consumer.run())
        try:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    record = await store.get(job_id)
                except RedisError:  # a test that takes Redis away
                    record = None
                if record is not None and record.status.terminal:
                    break
                await asyncio.sleep(0.1)
        finally:
            await consumer.drain(timeout=1)
            loop.cancel()
        dead = await store.r.xrange(redis_keys.DEAD_LETTER_STREAM)
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
    record, dead = _run_until_ended(settings, hung_sampler)
    assert record.status == JobStatus.failed
    assert "took longer than the shard time limit" in (record.error.message if record.error else "")
    assert "timed out after 0.3 s" in dead[-1][1]["reason"]  # the detail, for the operator
    assert calls == [1, 2]


def test_an_unparseable_shard_fails_its_job_instead_of_stranding_it(stack):
    async def never_called(task: ShardTask) -> ShardResult:
        raise AssertionError("an unreadable shard must not be sampled")

    async def break_the_shard(store: JobStore, job_id: str) -> None:
        (shard_id,) = await store.r.lrange(redis_keys.owner_shards("tester"), 0, -1)  # the real shard, made unreadable
        await store.r.hset(redis_keys.QUEUE_MESSAGES, shard_id, json.dumps({"job_id": job_id, "shard": "zero?"}))

    record, dead = _run_until_ended(_settings(stack, 4), never_called, break_the_shard)
    assert record.status == JobStatus.failed and record.error.code == "shard_unreadable"
    assert len(dead) == 1 and dead[0][1]["reason"] == "unparseable message"


def test_a_lost_denoiser_replica_does_not_spend_an_attempt(stack):
    """Replicas that die under a shard (kill -9, preemption) put it back without spending its
    attempts: with max_attempts=1 the shard still succeeds on its third delivery."""
    calls: list[tuple[int, int]] = []

    async def dies_twice(task: ShardTask) -> ShardResult:
        calls.append((task.attempt, task.interruptions))
        if len(calls) <= 2:
            raise ReplicaLost("ActorDiedError")
        return _pixels(task)

    record, dead = _run_until_ended(_settings(stack, 3, max_attempts=1), dies_twice)
    assert record.status == JobStatus.succeeded and record.images_done == 1
    assert calls == [(1, 0), (1, 1), (1, 2)]
    assert dead == []


def test_a_dead_workers_shard_is_reclaimed_without_spending_an_attempt(stack):
    """A shard held by a consumer that stopped heart-beating (its Worker was kill -9ed) is taken
    over after the visibility timeout as an interruption: with max_attempts=1 it still runs."""
    calls: list[tuple[int, int]] = []

    async def sampler(task: ShardTask) -> ShardResult:
        calls.append((task.attempt, task.interruptions))
        return _pixels(task)

    async def held_by_a_dead_worker(store: JobStore, job_id: str) -> None:
        assert len(await store.queue.read("dead-worker", int(time.time() * 1000), 100)) == 1  # read, never acked

    settings = _settings(stack, 3, max_attempts=1, visibility_timeout_seconds=0.5)
    record, dead = _run_until_ended(settings, sampler, held_by_a_dead_worker, seconds=20)
    assert record.status == JobStatus.succeeded
    assert calls == [(1, 1)] and dead == []


def test_shards_of_a_worker_killed_mid_intake_and_of_a_lost_denoiser_each_complete_once(stack):
    """A Worker killed right after admitting two of a job's three shards (leased to it, never
    heart-beaten) and a Denoiser replica dying under the third: no shard is lost and none is
    sampled to completion twice."""
    completed: dict[int, int] = {}
    lost: list[int] = []

    async def sampler(task: ShardTask) -> ShardResult:
        if task.shard == 2 and not lost:
            lost.append(task.shard)
            raise ReplicaLost("ActorDiedError")
        completed[task.shard] = completed.get(task.shard, 0) + 1
        return _pixels(task)

    async def admitted_by_a_worker_that_dies(store: JobStore, job_id: str) -> None:
        taken = await store.queue.read("dead-worker", int(time.time() * 1000), window=1000, count=2)
        assert sorted(m.task.shard for m in taken) == [0, 1]

    settings = _settings(stack, 3, max_attempts=1, visibility_timeout_seconds=0.5)
    params = PARAMS.model_copy(update={"num_images": 3 * settings.shard_size})
    record, dead = _run_until_ended(settings, sampler, admitted_by_a_worker_that_dies, seconds=30, params=params)
    assert record.status == JobStatus.succeeded and record.images_done == params.num_images
    assert completed == {0: 1, 1: 1, 2: 1} and lost == [2] and dead == []


def test_a_shard_that_keeps_killing_replicas_fails_its_job(stack):
    """A shard under which the replica always dies (it crashes it, say) is not retried forever:
    after max_interruptions losses each further loss spends an attempt."""
    calls: list[tuple[int, int]] = []

    async def always_dies(task: ShardTask) -> ShardResult:
        calls.append((task.attempt, task.interruptions))
        raise ReplicaLost("ActorDiedError")

    settings = _settings(stack, 3, max_attempts=2, max_interruptions=1)
    record, dead = _run_until_ended(settings, always_dies, seconds=20)
    assert record.status == JobStatus.failed and "the replica sampling it stopped" in record.error.message
    assert "replica lost" in dead[-1][1]["reason"]
    assert calls == [(1, 0), (1, 1), (2, 1)]
    assert len(dead) == 1


def test_a_worker_dying_between_the_last_completion_and_the_manifest_leaves_no_job_without_one(stack):
    """The Worker completed the job's last shard, then died before writing the manifest: the job
    stays running (never succeeded without a manifest) and the shard's redelivery writes the
    manifest and succeeds the job without sampling it again."""
    import hashlib

    from service.storage import image_key, manifest_key

    calls: list[int] = []
    settings = _settings(stack, 3, visibility_timeout_seconds=0.5)
    objects = ObjectStore(settings.storage)
    png = b"not-really-a-png"

    async def sampler(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        return _pixels(task)

    async def died_after_completion(store: JobStore, job_id: str) -> None:
        [message] = await store.queue.read("dead-worker", int(time.time() * 1000), 100)  # read, never acked
        await store.mark_running(job_id, "tester")
        await asyncio.to_thread(objects.put_image, image_key(job_id, 0), png)
        assert await store.complete_shard(message.task, [(hashlib.sha256(png).hexdigest(), len(png))]) == (
            "running",
            True,
        )
        assert (await store.get(job_id)).status == JobStatus.running
        assert await asyncio.to_thread(objects.get_bytes, manifest_key(job_id)) is None

    record, dead = _run_until_ended(settings, sampler, died_after_completion, seconds=20)
    assert record.status == JobStatus.succeeded and calls == [] and dead == []
    manifest = json.loads(objects.get_bytes(manifest_key(record.id)))
    assert manifest["job_id"] == record.id and manifest["params"] == PARAMS.model_dump(mode="json")
    assert manifest["images"] == [
        {"index": 0, "seed": 0, "key": image_key(record.id, 0), "sha256": hashlib.sha256(png).hexdigest(), "size": 16}
    ]


def _pixels(task: ShardTask) -> ShardResult:
    image = np.full((task.count, 28, 28, 1), 128, dtype=np.uint8)
    return ShardResult(job_id=task.job_id, shard=task.shard, pixels=image.tobytes(), shape=image.shape)


@contextmanager
def _server_away_while_sampling(server, seconds: float):
    """Yields (generate, calls): a Denoiser stand-in that stops `server` while it "samples",
    starts it again `seconds` later (once, whatever the retries) and returns finished pixels.
    The restart is joined on exit, so the server is back before its own `with` stops it:
    nothing outlives the test, even a failing one."""
    calls: list[int] = []
    restart = threading.Timer(seconds, server.start)

    async def generate(task: ShardTask) -> ShardResult:
        calls.append(task.attempt)
        await asyncio.to_thread(server.stop)
        if restart.ident is None:
            restart.start()
        return _pixels(task)

    try:
        yield generate, calls
    finally:
        if restart.ident is not None:
            restart.join()


def test_an_s3_outage_is_waited_out_without_spending_an_attempt(stack, tmp_path):
    """S3 goes away while the shard samples and comes back 3 s later: the finished images wait
    for it and the job succeeds with the one sampling call (sampling again would not bring S3
    back, and a short outage would spend every attempt within seconds)."""
    from service.dev.servers import S3Server

    with S3Server(tmp_path / "s3", access_key=S3_KEY, secret_key=S3_SECRET).start() as s3:
        settings = _settings(stack, 5, s3_endpoint_url=s3.endpoint, s3_bucket="outage", s3_max_attempts=1)
        ObjectStore(settings.storage).ensure_bucket()
        with _server_away_while_sampling(s3, 3.0) as (generate, calls):
            record, dead = _run_until_ended(settings, generate, seconds=90)
        listed = ObjectStore(settings.storage).client.list_objects_v2(Bucket="outage", Prefix=f"jobs/{record.id}/")
    assert record.status == JobStatus.succeeded and record.error is None, record
    assert calls == [1] and dead == []
    assert [o["Key"] for o in listed.get("Contents", [])] == [
        f"jobs/{record.id}/00000.png",
        f"jobs/{record.id}/manifest.json",
    ]


def test_a_redis_blip_after_sampling_completes_the_shard_as_soon_as_redis_returns(stack, tmp_path):
    """Redis stops right after sampling and restarts from its AOF 2 s later: the shard is
    completed when Redis answers again, not after the 300 s visibility timeout, and its images
    are not sampled a second time."""
    from service.dev.servers import RedisServer

    with RedisServer(tmp_path / "redis").start() as redis_server:
        settings = _settings(stack, 0, redis_url=redis_server.url, visibility_timeout_seconds=300.0)
        started = time.monotonic()
        with _server_away_while_sampling(redis_server, 2.0) as (generate, calls):
            record, _ = _run_until_ended(settings, generate, seconds=60)
        elapsed = time.monotonic() - started
    assert record.status == JobStatus.succeeded and calls == [1]
    assert elapsed < 30, f"took {elapsed:.0f} s"


def test_readiness_details_stay_out_of_the_unauthenticated_answer():
    async def refused():
        raise ConnectionError("Error 111 connecting to 10.1.2.3:6379. Connection refused.")

    name, state = asyncio.run(_check("redis", refused))
    assert (name, state) == ("redis", "unavailable: ConnectionError")


def test_images_of_a_job_canceled_while_its_shard_ran_are_taken_back(stack):
    """The shard finished sampling although its job was canceled meanwhile (the Denoiser had not
    seen it yet): once uploaded, its images are deleted again rather than left for a sweep that
    may already have run."""
    settings = _settings(stack, 3)
    objects = ObjectStore(settings.storage)

    async def scenario() -> tuple[int, int, int]:
        store = JobStore.from_settings(settings)
        await store.r.flushdb()
        job_id, _, _ = await store.submit("tester", PARAMS, {"n": 1})

        async def canceled_meanwhile(task: ShardTask) -> ShardResult:
            await store.finish(task.job_id, "tester", JobStatus.canceled)
            return _pixels(task)

        consumer = Consumer(settings.queue, store, objects, canceled_meanwhile, name="cancel-test")
        loop = asyncio.create_task(consumer.run())
        deadline = time.monotonic() + 20
        while consumer.handled == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await consumer.drain(timeout=5)
        loop.cancel()
        left = await asyncio.to_thread(
            objects.client.list_objects_v2, Bucket=settings.s3_bucket, Prefix=f"jobs/{job_id}/"
        )
        pending = await store.queue.depth()
        await store.r.flushdb()
        await store.close()
        return left.get("KeyCount", 0), consumer.handled, pending

    left, handled, pending = asyncio.run(scenario())
    assert handled == 1 and pending == 0 and left == 0


def test_a_duplicate_attempt_finishing_after_the_shard_completed_leaves_its_images_alone(stack):
    """Two attempts of one shard at once (a live Worker's shard reclaimed after its heartbeats
    failed to reach Redis): the first completes the shard and the job, with the manifest written
    from its bytes; the second, still sampling then, must not replace the stored images with its
    own, which can differ (the UNet's output for a row depends on its batch, tests/core/
    test_engine.py), or the manifest would vouch for bytes the bucket no longer holds."""
    import hashlib

    from service.storage import image_key, manifest_key

    settings = _settings(stack, 3)
    objects = ObjectStore(settings.storage)

    async def scenario() -> tuple[dict, bytes, JobRecord, int]:
        store = JobStore.from_settings(settings)
        await store.r.flushdb()
        job_id, _, _ = await store.submit("tester", PARAMS, {"n": 1})
        [message] = await store.queue.read("first", FAR, 100)
        first_done = asyncio.Event()

        async def first(task: ShardTask) -> ShardResult:
            return _pixels(task)

        async def second(task: ShardTask) -> ShardResult:  # the same image, one grey level off
            await first_done.wait()
            image = np.full((task.count, 28, 28, 1), 129, dtype=np.uint8)
            return ShardResult(job_id=task.job_id, shard=task.shard, pixels=image.tobytes(), shape=image.shape)

        late = Consumer(settings.queue, store, objects, second, name="second")
        duplicate = asyncio.create_task(late.handle(message))  # reads the record, then samples
        await asyncio.sleep(0.3)
        await Consumer(settings.queue, store, objects, first, name="first").handle(message)
        first_done.set()
        await asyncio.wait_for(duplicate, 20)
        manifest = json.loads(await asyncio.to_thread(objects.get_bytes, manifest_key(job_id)))
        stored = await asyncio.to_thread(objects.get_bytes, image_key(job_id, 0))
        record = await store.get(job_id)
        pending = await store.queue.depth()
        await store.r.flushdb()
        await store.close()
        return manifest, stored, record, pending

    manifest, stored, record, pending = asyncio.run(scenario())
    assert record.status == JobStatus.succeeded and record.images_done == 1 and pending == 0
    [entry] = manifest["images"]
    assert (hashlib.sha256(stored).hexdigest(), len(stored)) == (entry["sha256"], entry["size"])


def test_an_image_an_earlier_attempt_wrote_stands_and_the_manifest_vouches_for_it(stack):
    """An attempt that uploaded an image and died before recording the shard (or one uploading
    at the same instant as this one): its image stays (the upload is a conditional PUT), and the
    completion records the checksum of the bytes the bucket holds, not of this attempt's."""
    import hashlib

    from service.storage import image_key, manifest_key
    from undiffuse.images import png_bytes

    settings = _settings(stack, 3)
    objects = ObjectStore(settings.storage)
    earlier = png_bytes(np.full((28, 28, 1), 127, dtype=np.uint8))
    job: dict[str, str] = {}

    async def prepare(store, job_id):
        job["id"] = job_id
        await asyncio.to_thread(objects.put_image, image_key(job_id, 0), earlier)

    async def generate(task: ShardTask) -> ShardResult:
        return _pixels(task)  # grey 128: other bytes than the earlier attempt's

    record, _ = _run_until_ended(settings, generate, prepare)
    assert record.status == JobStatus.succeeded
    stored = objects.get_bytes(image_key(job["id"], 0))
    [entry] = json.loads(objects.get_bytes(manifest_key(job["id"])))["images"]
    assert stored == earlier
    assert (entry["sha256"], entry["size"]) == (hashlib.sha256(earlier).hexdigest(), len(earlier))


def test_a_job_canceled_while_its_manifest_was_written_keeps_no_manifest_and_is_not_logged_succeeded(stack, caplog):
    """Every shard done, the manifest written, and then the job is canceled before the succeed
    transition: the job stays canceled, its manifest is taken back like its images (the cancel's
    sweep may have run already), and the Worker does not log that the job succeeded."""
    import logging

    from service.jobs.lifecycle import JobLifecycle
    from service.storage import manifest_key

    settings = _settings(stack, 3)
    objects = ObjectStore(settings.storage)

    class CanceledBeforeSuccess(JobLifecycle):
        async def succeed(self, record: JobRecord) -> bool:
            assert await asyncio.to_thread(objects.get_bytes, manifest_key(record.id)) is not None
            await self.store.finish(record.id, record.owner, JobStatus.canceled)
            return await super().succeed(record)

    async def scenario() -> tuple[JobRecord, bytes | None, int]:
        store = JobStore.from_settings(settings)
        await store.r.flushdb()
        job_id, _, _ = await store.submit("tester", PARAMS, {"n": 1})
        [message] = await store.queue.read("worker", FAR, 100)

        async def sampler(task: ShardTask) -> ShardResult:
            return _pixels(task)

        consumer = Consumer(
            settings.queue, store, objects, sampler, name="worker", lifecycle=CanceledBeforeSuccess(store)
        )
        await consumer.handle(message)
        record = await store.get(job_id)
        manifest = await asyncio.to_thread(objects.get_bytes, manifest_key(job_id))
        pending = await store.queue.depth()
        await store.r.flushdb()
        await store.close()
        return record, manifest, pending

    with caplog.at_level(logging.INFO, logger="ray.serve"):
        record, manifest, pending = asyncio.run(scenario())
    assert record.status == JobStatus.canceled and pending == 0
    assert manifest is None
    assert not [r for r in caplog.records if getattr(r, "status", None) == "succeeded"]


# --- outcomes: how an attempt's end is applied to its message ------------------------------------
class _Recorder:
    """A queue and a lifecycle in one, recording every write in order; the first `refuse` writes
    fail as if Redis were away."""

    def __init__(self, refuse: int = 0) -> None:
        self.writes: list[tuple] = []
        self.refuse = refuse
        self.queue = self

    async def _write(self, *call) -> bool:
        if self.refuse:
            self.refuse -= 1
            raise RedisError("Connection refused")
        self.writes.append(call)
        return True

    async def ack(self, message_id):
        return await self._write("ack", message_id)

    async def requeue(self, message_id, task):
        return await self._write("requeue", message_id, task.attempt, task.interruptions, task.last_error_kind)

    async def put_back(self, message_id, task):
        return await self._write("put_back", message_id, task.attempt, task.interruptions, task.last_error_kind)

    async def dead_letter(self, message_id, fields, reason):
        return await self._write("dead_letter", message_id, json.loads(fields["task"])["shard"], reason)

    async def fail(self, record, error):
        return await self._write("fail", record.id, error.code, error.message)


def _settled(outcome, task: ShardTask | None = None, refuse: int = 0, **overrides) -> list[tuple]:
    from worker.consumer import Consumer

    recorder = _Recorder(refuse)
    settings = Settings(**{"max_interruptions": 2, "dependency_patience_seconds": 5.0, **overrides})
    consumer = Consumer(settings.queue, recorder, None, None, name="settle-test", lifecycle=recorder)
    task = task or ShardTask(job_id="j" * 32, shard=0, start=0, count=1, params=PARAMS)
    asyncio.run(consumer._settle("lease-1", task, outcome))
    return recorder.writes


def _record() -> JobRecord:
    return JobRecord(
        id="j" * 32, owner="tester", status=JobStatus.running, params=PARAMS, created_at=1.0, started_at=2.0,
        finished_at=None, error=None, num_shards=1, shard_size=4, images_done=0, shard_steps={}, done_shards=set(),
    )  # fmt: skip


def test_each_outcome_settles_the_message_its_own_way():
    from worker.consumer import Outcome

    task = ShardTask(job_id="j" * 32, shard=0, start=0, count=1, params=PARAMS)
    assert _settled(Outcome.done()) == [("ack", "lease-1")]
    assert _settled(Outcome.ended("its job ended")) == [("ack", "lease-1")]
    assert _settled(Outcome.left_pending("Redis error")) == []  # the lease lapses; the shard is reclaimed
    # a failure of the shard spends an attempt (ShardQueue.requeue counts it) and says what kind it was
    assert _settled(Outcome.retry("upload failed: EndpointConnectionError", "storage")) == [
        ("requeue", "lease-1", 1, 0, "storage")
    ]
    # a lost replica does not, until the shard has lost max_interruptions (2) of them
    assert _settled(Outcome.interrupted("Denoiser replica lost")) == [("put_back", "lease-1", 1, 1, "replica_lost")]
    worn = task.model_copy(update={"interruptions": 2})
    assert _settled(Outcome.interrupted("Denoiser replica lost"), worn) == [
        ("requeue", "lease-1", 1, 2, "replica_lost")  # requeue counts the attempt
    ]


def test_a_shard_out_of_attempts_fails_its_job_before_it_is_dead_lettered():
    from worker.consumer import Outcome

    task = ShardTask(
        job_id="j" * 32, shard=0, start=0, count=1, params=PARAMS, attempt=4, last_error="x", last_error_kind="timeout"
    )
    writes = _settled(Outcome.failed(_record()), task)
    assert [w[0] for w in writes] == ["fail", "dead_letter"]
    assert writes[0][2] == "shard_failed" and "took longer than the shard time limit" in writes[0][3]
    assert writes[1][2] == 0 and "failed 3 times; last error: x" in writes[1][3]


def test_settling_waits_out_a_short_redis_outage_and_gives_up_after_the_patience():
    from worker.consumer import DependencyAway, Outcome

    assert _settled(Outcome.done(), refuse=2) == [("ack", "lease-1")]  # refused twice, then written
    with pytest.raises(DependencyAway):
        _settled(Outcome.done(), refuse=100, dependency_patience_seconds=0.6)
