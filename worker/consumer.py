"""The shard consumer: at-least-once processing of the shard queue (service.jobs.queue).

The consumer admits shards as the Denoiser replicas have room for them (twice their batches in
flight across the deployment, fairly across owners: service.jobs.queue). One delivery of a shard
is an *attempt*, a sequence of stages:

1. claim: read the job; skip the shard if its job has ended; fail the job if the shard is out of
   attempts; mark the job running;
2. sample: the Denoiser makes the shard's pixels;
3. upload: PNGs under deterministic keys (an image an earlier attempt wrote stands);
4. record: the shard done with its PNGs' checksums; if that completed the job, its manifest,
   then the succeed transition.

A stage that cannot go on ends the attempt with an `Outcome`, and `Consumer._settle` applies
every outcome to the shard's message in one place: ack (done, or nothing left to do), requeue as
the next attempt, put back without spending one (its replica died), fail the job and
dead-letter the shard (out of attempts), or leave the lease to lapse (Redis away before any
image existed). A redelivered shard that is already done skips to the record stage, and so does
an attempt whose shard a duplicate attempt completed while it sampled (it uploads nothing).

Once a shard's images exist, Redis and S3 outages are waited out (`_redis`, `_s3`) for up to
dependency_patience_seconds; an outage longer than that spends an attempt. A shard whose
consumer died (no heartbeat for the visibility timeout) is reclaimed when its lease expires and
put back, and since object keys are deterministic and completion is idempotent, each image
ends up in the bucket exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import numpy as np
from redis.exceptions import RedisError

from service import metrics
from service.archive import write_manifest
from service.jobs import capacity
from service.jobs.capacity import Capacity
from service.jobs.lifecycle import JobLifecycle
from service.jobs.queue import Message
from service.jobs.records import JobError, JobStatus, ShardResult, ShardTask
from service.jobs.store import JobRecord, JobStore
from service.logs import ms, shard_fields
from service.settings import QueueSettings
from service.storage import STORAGE_ERRORS, ObjectStore, image_key, manifest_key
from undiffuse.images import encode_image
from worker.loop import run_until_stopped

log = logging.getLogger("ray.serve")
IDLE_TICK_SECONDS = 0.25  # with nothing admitted, look again after this long at most
REPLICA_LOST_PAUSE_SECONDS = 1.0  # before a shard whose replica died goes back: Serve notices the death
PUBLIC_REASONS = {
    "timeout": "sampling took longer than the shard time limit",
    "sampler": "the model could not sample it",
    "storage": "its images could not be stored",
    "redis": "its completion could not be recorded",
    "replica_lost": "the replica sampling it stopped each time",
}
"""What a failed job's error tells its owner, by the kind of the shard's last failure."""
T = TypeVar("T")


def job_id_of(fields: dict) -> str | None:
    """The job id a broken shard message still names, if any."""
    try:
        job_id = json.loads(fields.get("task", "")).get("job_id")
    except (ValueError, AttributeError):
        return None
    return job_id if isinstance(job_id, str) and job_id else None


class ReplicaLost(Exception):
    """The Denoiser replica sampling a shard died (raised by `generate`). Not the shard's failure
    unless it keeps happening: see Settings.max_interruptions."""


Generate = Callable[[ShardTask], Awaitable[ShardResult]]


class Settle(str, Enum):
    """What becomes of a shard's message when an attempt ends."""

    done = "done"  # the shard is complete: ack
    ended = "ended"  # nothing to do (its job ended, or the shard was canceled under the Denoiser): ack
    retry = "retry"  # the shard failed: back in the queue as its next attempt
    interrupted = "interrupted"  # its replica died: back without spending an attempt (see max_interruptions)
    failed = "failed"  # out of attempts: fail the job, dead-letter the shard
    left_pending = "left_pending"  # Redis is away: the lease lapses and the shard is reclaimed


@dataclass(frozen=True)
class Outcome:
    """How one attempt at a shard ended; `Consumer._settle` applies it.

    reason: the failure in words (the task's last_error for retry and interrupted; the log's
    otherwise); kind: the retry metric's reason, and for retry what the owner is told
    (PUBLIC_REASONS); record: the job to fail (failed)."""

    settle: Settle
    reason: str = ""
    kind: str = ""
    record: JobRecord | None = None

    @classmethod
    def done(cls) -> Outcome:
        return cls(Settle.done)

    @classmethod
    def ended(cls, reason: str) -> Outcome:
        return cls(Settle.ended, reason)

    @classmethod
    def retry(cls, reason: str, kind: str) -> Outcome:
        return cls(Settle.retry, reason, kind)

    @classmethod
    def interrupted(cls, reason: str, kind: str = "replica_lost") -> Outcome:
        return cls(Settle.interrupted, reason, kind)

    @classmethod
    def failed(cls, record: JobRecord) -> Outcome:
        return cls(Settle.failed, "out of attempts", record=record)

    @classmethod
    def left_pending(cls, reason: str) -> Outcome:
        return cls(Settle.left_pending, reason)


class Stop(Exception):
    """Raised by a stage that ends the attempt early, with the attempt's outcome."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.reason or outcome.settle.value)
        self.outcome = outcome


class DependencyAway(Exception):
    """Redis or S3 stayed away for dependency_patience_seconds (or the consumer began draining
    while it waited)."""

    def __init__(self, step: str, error: BaseException) -> None:
        super().__init__(f"{step}: {type(error).__name__}: {error}")
        self.step, self.error = step, error

    @property
    def kind(self) -> str:
        return "redis" if isinstance(self.error, RedisError) else "storage"


class Consumer:
    def __init__(
        self,
        settings: QueueSettings,
        store: JobStore,
        objects: ObjectStore,
        generate: Generate,
        name: str,
        lifecycle: JobLifecycle | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.queue = store.queue
        self.lifecycle = lifecycle or JobLifecycle(store, purge_delay_seconds=settings.purge_delay_seconds)
        self.objects = objects
        self.generate = generate
        self.name = name
        self.inflight: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self._last_reclaim = 0.0
        self._wake: asyncio.Task | None = None  # a pending wait for a submission
        self._capacity_cache: tuple[float, Capacity] | None = None
        self.handled = 0
        self._uploads = ThreadPoolExecutor(max_workers=8, thread_name_prefix="upload")

    # --- the loop ------------------------------------------------------------------------------
    async def run(self) -> None:
        await run_until_stopped(
            f"consumer {self.name}", self._poll_once, self.stopping, dependency_errors=(RedisError, DependencyAway)
        )

    async def _poll_once(self) -> None:
        """Admit what the Denoisers have room for (service.jobs.queue); with nothing admitted,
        wait for a submission, one of this Worker's shards to finish, or a short tick (another
        Worker's shards finishing frees room too)."""
        await self._reclaim_stale()
        window = (await self._capacity()).window(self.settings.intake_fallback_rows)
        if self.stopping.is_set():  # draining: admit nothing more
            return
        messages = await self.queue.read(self.name, self._deadline_ms(), window)
        for message in messages:  # handled before anything else can fail: they are leased to us
            task = asyncio.create_task(self.handle(message))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        totals = await self.queue.totals()
        metrics.queue_depth().set(totals.shards)
        metrics.queue_backlog_cost().set(totals.cost)
        if messages:
            return
        if self._wake is None or self._wake.done():
            # block for at most half the socket timeout, so an idle queue is never a read timeout
            self._wake = asyncio.create_task(self.queue.wait_for_work(self.settings.redis_timeout_seconds / 2))
        await asyncio.wait({self._wake, *self.inflight}, timeout=IDLE_TICK_SECONDS, return_when=FIRST_COMPLETED)
        if self._wake.done() and self._wake.exception() is not None:
            self._wake.result()  # a Redis error: the run loop backs off

    async def _capacity(self) -> Capacity:
        """The Denoisers' reports, read at most once a second."""
        now = time.monotonic()
        if self._capacity_cache is None or now - self._capacity_cache[0] >= 1.0:
            self._capacity_cache = (now, await capacity.read(self.store.r))
        return self._capacity_cache[1]

    def _deadline_ms(self) -> int:
        """A lease taken or renewed now ends a visibility timeout from now."""
        return int((time.time() + self.settings.visibility_timeout_seconds) * 1000)

    async def drain(self, timeout: float) -> None:
        """Stop reading and give in-flight shards up to timeout seconds (SIGTERM grace)."""
        self.stopping.set()
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=timeout)

    async def _reclaim_stale(self) -> None:
        """Take over shards whose Worker stopped heart-beating and put them back."""
        now = time.monotonic()
        if now - self._last_reclaim < min(5.0, self.settings.visibility_timeout_seconds / 2):
            return
        self._last_reclaim = now
        for message in await self.queue.reclaim(self.name, int(time.time() * 1000), self._deadline_ms()):
            if message.task is None:
                await self._drop_unparseable(message)
                continue
            # its Worker died (kill -9, a lost node): like a lost Denoiser replica, an interruption
            interrupted = Outcome.interrupted("its Worker stopped heart-beating", kind="reclaimed")
            await self._settle(message.id, message.task, interrupted)

    async def _drop_unparseable(self, message: Message) -> None:
        """Dead-letter a message that is not a ShardTask, and fail its job if it names one: left
        alone, the job would wait in `queued` until its record expires."""
        log.error("moving unparseable message %s to the dead-letter stream", message.id)
        await self.queue.dead_letter(message.id, message.fields, "unparseable message")
        job_id = job_id_of(message.fields)
        record = await self.store.get(job_id) if job_id else None
        if record is not None:
            error = JobError(code="shard_unreadable", message="a shard of this job could not be read from the queue")
            await self.lifecycle.fail(record, error)

    # --- one shard -----------------------------------------------------------------------------
    async def handle(self, message: Message) -> None:
        """One delivery of a shard: attempt it, then settle its message as the attempt ended,
        holding its lease throughout."""
        try:
            if message.task is None:
                await self._drop_unparseable(message)
                return
            async with self._holding(message.id):
                outcome = await self._attempt(message.task)
                await self._settle(message.id, message.task, outcome)
        except (RedisError, DependencyAway) as e:
            # the message stays leased, and is reclaimed after the visibility timeout
            log.warning("shard %s left pending: Redis error %s", message.id, e)
        finally:
            self.handled += 1

    async def _attempt(self, task: ShardTask) -> Outcome:
        """The attempt's stages in order (claim, sample, upload, record); a stage that cannot go
        on raises Stop with the attempt's outcome."""
        try:
            record = await self._claim(task)
            started = time.monotonic()
            if task.shard in record.done_shards:  # redelivered after its completion: finish what followed
                return await self._record(task, record, None)
            log.info("shard %s/%d attempt %d started", task.job_id, task.shard, task.attempt, extra=shard_fields(task))
            result = await self._sample(task)
            sampled = time.monotonic()
            done_by_another = await self._completed_by_another_attempt(task)
            if done_by_another is not None:
                return await self._record(task, done_by_another, None)
            files = await self._upload(task, result)
            await self._stop_if_ended_meanwhile(task)
            uploaded = time.monotonic()
            outcome = await self._record(task, record, files)
        except Stop as stop:
            return stop.outcome
        except DependencyAway as e:  # the images existed, and Redis or S3 stayed away past the patience
            log.warning("shard %s/%d: %s", task.job_id, task.shard, e, extra=shard_fields(task, error=str(e)))
            # the job's error is client-visible: the error's text (endpoint URLs) stays in the log
            return Outcome.retry(f"{e.step} failed: {type(e.error).__name__}", e.kind)
        except RedisError as e:  # before any image existed: nothing is lost by leaving the lease to lapse
            return Outcome.left_pending(f"Redis error {e}")
        log.info(
            "shard %s/%d done: %d images, %.0f ms sampling, %.0f ms upload",
            task.job_id, task.shard, task.count, ms(sampled - started), ms(uploaded - sampled),
            extra=shard_fields(
                task,
                images=task.count,
                sample_ms=ms(sampled - started),
                upload_ms=ms(uploaded - sampled),
                duration_ms=ms(time.monotonic() - started),
            ),
        )  # fmt: skip
        return outcome

    # The stages.
    async def _claim(self, task: ShardTask) -> JobRecord:
        """The shard's job, marked running."""
        record = await self.store.get(task.job_id)
        if record is None or record.status.terminal:
            raise Stop(Outcome.ended("its job ended"))  # canceled, failed, finished or expired
        if task.attempt > self.settings.max_attempts:
            raise Stop(Outcome.failed(record))
        if not await self.lifecycle.start(record):
            raise Stop(Outcome.ended("its job ended"))  # between the read and now
        return record

    async def _sample(self, task: ShardTask) -> ShardResult:
        """The shard's pixels from the Denoiser."""
        try:
            result = await asyncio.wait_for(self.generate(task), self.settings.shard_timeout_seconds)
        except asyncio.TimeoutError:  # a hung GPU or replica: give the shard to another attempt
            timeout = self.settings.shard_timeout_seconds
            raise Stop(Outcome.retry(f"sampling timed out after {timeout:g} s", "timeout")) from None
        except ReplicaLost as e:
            await asyncio.sleep(REPLICA_LOST_PAUSE_SECONDS)
            raise Stop(Outcome.interrupted(f"Denoiser replica lost: {e}")) from None
        except Exception as e:  # the Denoiser raised
            raise Stop(Outcome.retry(f"sampling failed: {type(e).__name__}: {e}", "sampler")) from None
        if result.canceled:
            log.info("shard %s/%d canceled", task.job_id, task.shard, extra=shard_fields(task))
            raise Stop(Outcome.ended("canceled under the Denoiser"))
        return result

    async def _upload(self, task: ShardTask, result: ShardResult) -> list[tuple[str, int]]:
        """The shard's PNGs in the bucket; the (sha256 hex, size) of each, in image order."""
        try:
            return await self._s3(task, "upload", self._put_images, task, result)
        except DependencyAway:
            raise
        except Exception as e:  # a malformed result
            raise Stop(Outcome.retry(f"sampling failed: {type(e).__name__}: {e}", "sampler")) from None

    async def _record(self, task: ShardTask, record: JobRecord, files: list[tuple[str, int]] | None) -> Outcome:
        """The shard's images are in the bucket: record it done (files: their checksums; None
        for a shard that is done already); if that completes the job, write the manifest, then
        move the job to succeeded. A manifest that cannot be written (S3 away beyond the
        patience) spends the attempt, and the shard's next attempt tries again."""
        all_done = await self._redis(task, "completion", self.lifecycle.complete_shard, task, record, files)
        if files is not None:
            metrics.images_generated_total().inc(task.count, tags={"model": task.params.model})
        if all_done:
            checksums = await self._redis(task, "manifest", self.store.files, record)
            await self._s3(task, "manifest", write_manifest, self.objects, record, checksums)
            await self._succeed(task, record)
        return Outcome.done()

    # What the stages check on the way.
    async def _completed_by_another_attempt(self, task: ShardTask) -> JobRecord | None:
        """The job's record if a duplicate attempt of this shard (its message reclaimed while
        this Worker still worked on it, e.g. its heartbeats did not reach Redis) completed the
        shard while this one sampled. Then its images and their checksums stand, and these are
        not uploaded: their bytes can differ (the network's output for a row depends on its
        batch) and would leave the manifest vouching for bytes the bucket no longer holds. What
        follows the completion is finished as for a redelivered done shard. (Two attempts
        uploading at the very same time cannot leave it so either: each image is written once,
        by a conditional PUT, and both record the checksums of what stands, whichever attempt
        wrote it; see `_put_images`.)"""
        now = await self._redis(task, "status", self.store.get, task.job_id)
        if now is None or task.shard not in now.done_shards:
            return None
        log.warning(
            "shard %s/%d attempt %d: completed by another attempt meanwhile; its images stand",
            task.job_id, task.shard, task.attempt, extra=shard_fields(task),
        )  # fmt: skip
        return now

    async def _stop_if_ended_meanwhile(self, task: ShardTask) -> None:
        """A job that ended badly (or was deleted, or expired) while this shard uploaded may
        have been swept already: take back what this shard just wrote, and stop."""
        now = await self._redis(task, "status", self.store.get, task.job_id)
        if now is not None and now.status not in (JobStatus.failed, JobStatus.canceled):
            return
        suffix = task.params.image_suffix
        await self._take_back([image_key(task.job_id, task.start + k, suffix) for k in range(task.count)])
        raise Stop(Outcome.ended("its job ended while the shard uploaded"))

    async def _succeed(self, task: ShardTask, record: JobRecord) -> None:
        """The succeed transition, its manifest written. If the job ended otherwise meanwhile
        (canceled or failed between the completion and now: its sweep may have run already), the
        manifest just written is taken back like a late shard's images; if a duplicate attempt
        succeeded it first, both wrote the same manifest and it stays."""
        if await self._redis(task, "success", self.lifecycle.succeed, record):
            took = time.time() - record.created_at
            log.info(
                "job %s succeeded: %d images in %.1f s", task.job_id, task.params.num_images, took,
                extra=shard_fields(task, status="succeeded", images=task.params.num_images, duration_ms=ms(took)),
            )  # fmt: skip
            return
        now = await self._redis(task, "status", self.store.get, task.job_id)
        if now is not None and now.status == JobStatus.succeeded:
            return
        await self._take_back([manifest_key(task.job_id)])

    async def _take_back(self, keys: list[str]) -> None:
        """Delete objects of a job that ended; once: the bucket's lifecycle rule is the backstop."""
        try:
            await asyncio.to_thread(self.objects.delete_keys, keys)
        except STORAGE_ERRORS as e:
            log.warning("objects of an ended job not deleted (%s): %s", e, ", ".join(keys))

    # --- settling ------------------------------------------------------------------------------
    async def _settle(self, message_id: str, task: ShardTask, outcome: Outcome) -> None:
        """Apply how an attempt ended to the shard's message: the one place a message is
        settled. Each write waits out a Redis outage (repeating any of them is harmless: a
        settle with a lease that is no longer this delivery's does nothing)."""
        match outcome.settle:
            case Settle.done | Settle.ended:
                await self._redis(task, "ack", self.queue.ack, message_id)
            case Settle.retry:
                log.warning(
                    "shard %s/%d attempt %d failed: %s", task.job_id, task.shard, task.attempt, outcome.reason,
                    extra=shard_fields(task, error=outcome.reason),
                )  # fmt: skip
                metrics.shard_retries_total().inc(tags={"reason": outcome.kind})
                await asyncio.sleep(min(0.5 * task.attempt, 5.0))
                retried = task.model_copy(update={"last_error": outcome.reason, "last_error_kind": outcome.kind})
                await self._redis(task, "requeue", self.queue.requeue, message_id, retried)
            case Settle.interrupted:
                await self._put_back_interrupted(message_id, task, outcome)
            case Settle.failed:
                assert outcome.record is not None
                await self._fail(message_id, task, outcome.record)
            case Settle.left_pending:
                log.warning("shard %s left pending: %s", message_id, outcome.reason)

    async def _put_back_interrupted(self, message_id: str, task: ShardTask, outcome: Outcome) -> None:
        """A replica (Denoiser or Worker) died under the shard: back in the queue without spending
        an attempt, unless it has been interrupted max_interruptions times already, after which
        each interruption counts as an attempt (a shard that kills its replicas must end)."""
        log.warning(
            "shard %s/%d: %s; putting it back", task.job_id, task.shard, outcome.reason,
            extra=shard_fields(task, error=outcome.reason),
        )  # fmt: skip
        metrics.shard_retries_total().inc(tags={"reason": outcome.kind})
        if task.interruptions >= self.settings.max_interruptions:
            update = {"last_error": f"{outcome.reason} (again)", "last_error_kind": "replica_lost"}
            await self._redis(task, "requeue", self.queue.requeue, message_id, task.model_copy(update=update))
            return
        update = {
            "interruptions": task.interruptions + 1,
            "last_error": outcome.reason,
            "last_error_kind": "replica_lost",
        }
        await self._redis(task, "put back", self.queue.put_back, message_id, task.model_copy(update=update))

    async def _fail(self, message_id: str, task: ShardTask, record: JobRecord) -> None:
        """The job first, then the message: if Redis fails in between, the message stays pending,
        is reclaimed, and this runs again (failing an ended job is a no-op), so the job can never
        be left running with its shard already dead-lettered."""
        message = f"shard {task.shard} failed {task.attempt - 1} times; last error: {task.last_error}"
        log.warning("job %s failed: %s", task.job_id, message, extra=shard_fields(task, status="failed", error=message))
        # tenants get what went wrong in words; exception text (Ray, CUDA, addresses) stays in logs
        public = PUBLIC_REASONS.get(task.last_error_kind or "", "an internal error")
        shown = f"shard {task.shard} failed {task.attempt - 1} times: {public}; the service log has the details"
        await self._redis(task, "failure", self.lifecycle.fail, record, JobError(code="shard_failed", message=shown))
        fields = {"task": task.model_dump_json()}
        await self._redis(task, "dead letter", self.queue.dead_letter, message_id, fields, message)

    # --- waiting out Redis and S3 --------------------------------------------------------------
    async def _redis(self, task: ShardTask, step: str, call: Callable[..., Awaitable[T]], *args: Any) -> T:
        """await call(*args), waiting out a Redis outage (see _wait_out). redis-py has already
        reconnected and retried the command a few times (service.jobs.connection)."""
        return await self._wait_out(task, step, (RedisError,), lambda: call(*args))

    async def _s3(self, task: ShardTask, step: str, call: Callable[..., T], *args: Any) -> T:
        """call(*args) in a thread (boto3 blocks), waiting out an S3 outage (see _wait_out).
        botocore has already retried each request (standard mode, s3_max_attempts)."""
        return await self._wait_out(task, step, STORAGE_ERRORS, lambda: asyncio.to_thread(call, *args))

    async def _wait_out(
        self, task: ShardTask, step: str, errors: tuple[type[BaseException], ...], call: Callable[[], Awaitable[T]]
    ) -> T:
        """await call(), retrying on errors with capped exponential backoff (0.5 s .. 10 s) for up
        to dependency_patience_seconds, or until the consumer drains; then DependencyAway. Every
        call made this way is harmless to repeat (deterministic object keys, idempotent
        completion and settling)."""
        deadline = time.monotonic() + self.settings.dependency_patience_seconds
        delay = 0.5
        while True:
            try:
                return await call()
            except errors as e:
                if self.stopping.is_set() or time.monotonic() + delay > deadline:
                    raise DependencyAway(step, e) from e
                log.warning(
                    "shard %s/%d: %s failed (%s); waiting %.1f s for the dependency",
                    task.job_id, task.shard, step, type(e).__name__, delay,
                )  # fmt: skip
                metrics.dependency_waits_total().inc(tags={"step": step})
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)

    # --- the lease and the bytes ---------------------------------------------------------------
    @asynccontextmanager
    async def _holding(self, message_id: str) -> AsyncIterator[None]:
        """Heart-beat the lease while the body runs."""
        heartbeat = asyncio.create_task(self._heartbeat(message_id))
        try:
            yield
        finally:
            heartbeat.cancel()

    async def _heartbeat(self, message_id: str) -> None:
        """Move the lease's deadline ahead while we work on the shard, so nobody reclaims it."""
        period = self.settings.visibility_timeout_seconds / 4
        while True:
            await asyncio.sleep(period)
            try:
                if not await self.queue.heartbeat(message_id, self._deadline_ms()):
                    log.warning("lease %s was taken over (its heartbeats were late)", message_id)
                    return  # another attempt holds the shard now; this one's settle will be refused
            except RedisError as e:
                log.warning("heartbeat for %s failed: %s", message_id, e)

    def _put_images(self, task: ShardTask, result: ShardResult) -> list[tuple[str, int]]:
        """Encode the shard's images in the job's format and upload them, keeping any an earlier
        or concurrent attempt wrote first; returns the (sha256 hex, size) of what the bucket
        holds, in image order."""
        pixels = np.frombuffer(result.pixels, dtype=np.uint8).reshape(result.shape)
        if pixels.shape[0] != task.count:
            raise RuntimeError(f"Denoiser returned {pixels.shape[0]} images for a shard of {task.count}")

        def upload(k: int) -> tuple[str, int]:
            # the first attempt to write an image wins; the checksums are of what stands
            params = task.params
            encoded = encode_image(pixels[k], params.output_format, params.output_quality)
            data = self.objects.put_image_once(image_key(task.job_id, task.start + k, params.image_suffix), encoded)
            return hashlib.sha256(data).hexdigest(), len(data)

        # boto3 clients are thread-safe; uploads overlap their network round trips
        return list(self._uploads.map(upload, range(task.count)))
