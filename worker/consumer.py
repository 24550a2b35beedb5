"""The shard consumer: at-least-once processing of the shard queue (service.jobs.queue).

The consumer admits shards as the Denoiser replicas have room for them (twice their batches in
flight across the deployment, fairly across owners: service.jobs.queue), and for each shard:
skip it if its job is finished or canceled; mark the job running; call the Denoiser; upload
the PNGs under deterministic keys; record the shard done (with its PNGs' checksums); if that
completed the job, write its manifest and move it to succeeded; and only then ack. A redelivered shard that is already done skips straight to the last two steps, and so
does an attempt whose shard a duplicate attempt completed while it sampled (it uploads nothing).
A failure puts the shard back as its next attempt; a shard that exhausts its attempts fails
its job and goes to the dead-letter stream. A shard whose consumer died (no heartbeat for the
visibility timeout) is reclaimed when its lease expires and retried, and since object keys are
deterministic and completion is idempotent, each image ends up in the bucket exactly once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from asyncio import FIRST_COMPLETED
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

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
from service.settings import Settings
from service.storage import STORAGE_ERRORS, ObjectStore, image_key, manifest_key
from undiffuse.images import png_bytes

log = logging.getLogger("ray.serve")
IDLE_TICK_SECONDS = 0.25  # with nothing admitted, look again after this long at most
PUBLIC_REASONS = {
    "timeout": "sampling took longer than the shard time limit",
    "sampler": "the model could not sample it",
    "storage": "its images could not be stored",
    "replica_lost": "the replica sampling it stopped each time",
}
"""What a failed job's error tells its owner, by the kind of the shard's last failure."""


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


class Consumer:
    def __init__(
        self,
        settings: Settings,
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
        backoff = 0.5
        while not self.stopping.is_set():
            try:
                await self._poll_once()
                backoff = 0.5
            except RedisError as e:
                log.warning("consumer %s: Redis unavailable (%s); retrying in %.1fs", self.name, e, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # never let the loop die; the replica's health depends on it
                log.exception("consumer %s: unexpected error", self.name)
                await asyncio.sleep(1.0)

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
            task = message.task
            log.warning("reclaimed shard %s/%d from a silent consumer", task.job_id, task.shard)
            metrics.shard_retries_total().inc(tags={"reason": "reclaimed"})
            # its Worker died (kill -9, a lost node): like a lost Denoiser replica, an interruption
            await self._put_back_interrupted(message.id, task, "its Worker stopped heart-beating")

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
        try:
            if message.task is None:
                await self._drop_unparseable(message)
                return
            await self._process(message.id, message.task)
        except RedisError as e:
            # the message stays pending and is reclaimed after the visibility timeout
            log.warning("shard %s left pending: Redis error %s", message.id, e)
        finally:
            self.handled += 1

    async def _process(self, message_id: str, task: ShardTask) -> None:
        record = await self.store.get(task.job_id)
        if record is None or record.status.terminal:
            await self.queue.ack(message_id)  # canceled, failed, finished or expired
            return
        if task.attempt > self.settings.max_attempts:
            await self._fail(message_id, task, record)
            return
        if not await self.lifecycle.start(record):
            await self.queue.ack(message_id)  # ended between the read and now
            return

        heartbeat = asyncio.create_task(self._heartbeat(message_id))
        started = time.monotonic()
        try:
            if task.shard in record.done_shards:  # redelivered after its completion: finish what followed
                await self._completed(message_id, task, record, None)
                return
            log.info("shard %s/%d attempt %d started", task.job_id, task.shard, task.attempt, extra=shard_fields(task))
            try:
                result = await asyncio.wait_for(self.generate(task), self.settings.shard_timeout_seconds)
            except asyncio.TimeoutError:  # a hung GPU or replica: give the shard to another attempt
                timeout = self.settings.shard_timeout_seconds
                await self._retry(message_id, task, f"sampling timed out after {timeout:g} s", "timeout")
                return
            except ReplicaLost as e:
                await self._interrupted(message_id, task, e)
                return
            except Exception as e:  # the Denoiser raised or its replica died
                await self._retry(message_id, task, f"sampling failed: {type(e).__name__}: {e}", "sampler")
                return
            if await self._nothing_to_upload(message_id, task, result):
                return
            sampled = time.monotonic()
            # The images exist now: an outage of S3 or Redis is waited out with the pixels in hand,
            # not counted against the shard's attempts (which are for failures of the shard itself).
            try:
                files = await self._patiently(
                    "upload", lambda: asyncio.to_thread(self._upload, task, result), STORAGE_ERRORS, task
                )
            except STORAGE_ERRORS as e:  # S3 stayed away for dependency_patience_seconds
                # the job's error is client-visible: the storage error (endpoint URLs) goes to the log only
                log.warning("shard %s/%d upload failed: %s", task.job_id, task.shard, e)
                await self._retry(message_id, task, f"upload failed: {type(e).__name__}", "storage")
                return
            except Exception as e:  # a malformed result
                await self._retry(message_id, task, f"sampling failed: {type(e).__name__}: {e}", "sampler")
                return
            if await self._ended_meanwhile(message_id, task):
                return
            uploaded = time.monotonic()
            await self._completed(message_id, task, record, files)
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
        finally:
            heartbeat.cancel()

    async def _nothing_to_upload(self, message_id: str, task: ShardTask, result: ShardResult) -> bool:
        """The shard was canceled under the Denoiser, or completed by another attempt while this
        one sampled: ack (or finish what followed that completion) and say so."""
        if result.canceled:
            log.info("shard %s/%d canceled", task.job_id, task.shard, extra=shard_fields(task))
            await self.queue.ack(message_id)
            return True
        return await self._completed_by_another_attempt(message_id, task)

    async def _completed_by_another_attempt(self, message_id: str, task: ShardTask) -> bool:
        """Whether a duplicate attempt of this shard (its message reclaimed while this Worker still
        worked on it, e.g. its heartbeats did not reach Redis) completed the shard while this one
        sampled. Then its images and their checksums stand, and these are not uploaded: their
        bytes can differ (the network's output for a row depends on its batch) and would leave
        the manifest vouching for bytes the bucket no longer holds. What follows the completion
        is finished as for a redelivered done shard. (Two attempts uploading at the very same
        time cannot leave it so either: each image is written once, by a conditional PUT, and
        both record the checksums of what stands, whichever attempt wrote it; see `_upload`.)"""
        now = await self._patiently("status", lambda: self.store.get(task.job_id), (RedisError,), task)
        if now is None or task.shard not in now.done_shards:
            return False
        log.warning(
            "shard %s/%d attempt %d: completed by another attempt meanwhile; its images stand",
            task.job_id, task.shard, task.attempt, extra=shard_fields(task),
        )  # fmt: skip
        await self._completed(message_id, task, now, None)
        return True

    async def _ended_meanwhile(self, message_id: str, task: ShardTask) -> bool:
        """A job that ended badly (or was deleted, or expired) while this shard uploaded may
        have been swept already: take back what this shard just wrote, ack, and say so."""
        now = await self._patiently("status", lambda: self.store.get(task.job_id), (RedisError,), task)
        if now is not None and now.status not in (JobStatus.failed, JobStatus.canceled):
            return False
        keys = [image_key(task.job_id, task.start + k) for k in range(task.count)]
        try:
            await asyncio.to_thread(self.objects.delete_keys, keys)
        except STORAGE_ERRORS as e:  # the bucket's lifecycle rule is the backstop
            log.warning("shard %s/%d of an ended job: images not deleted (%s)", task.job_id, task.shard, e)
        await self._patiently("ack", lambda: self.queue.ack(message_id), (RedisError,), task)
        return True

    async def _completed(
        self, message_id: str, task: ShardTask, record: JobRecord, files: list[tuple[str, int]] | None
    ) -> None:
        """The shard's images are in the bucket: record it done (files: their checksums; None
        for a redelivered shard that is done already); if that completes the job, write the
        manifest, then move the job to succeeded; then ack. A manifest that cannot be written
        (S3 away beyond the patience) puts the shard back, and its redelivery tries again."""
        all_done = await self._patiently(
            "completion", lambda: self.lifecycle.complete_shard(task, record, files), (RedisError,), task
        )
        if files is not None:
            metrics.images_generated_total().inc(task.count, tags={"model": task.params.model})
        if all_done:
            checksums = await self._patiently("manifest", lambda: self.store.files(record), (RedisError,), task)
            try:
                await self._patiently(
                    "manifest",
                    lambda: asyncio.to_thread(write_manifest, self.objects, record, checksums),
                    STORAGE_ERRORS,
                    task,
                )
            except STORAGE_ERRORS as e:
                log.warning("job %s: manifest not written: %s", task.job_id, e)
                await self._retry(message_id, task, f"manifest upload failed: {type(e).__name__}", "storage")
                return
            await self._succeed(task, record)
        await self._patiently("ack", lambda: self.queue.ack(message_id), (RedisError,), task)

    async def _succeed(self, task: ShardTask, record: JobRecord) -> None:
        """The succeed transition, its manifest written. If the job ended otherwise meanwhile
        (canceled or failed between the completion and now: its sweep may have run already), the
        manifest just written is taken back like a late shard's images; if a duplicate attempt
        succeeded it first, both wrote the same manifest and it stays."""
        if await self._patiently("success", lambda: self.lifecycle.succeed(record), (RedisError,), task):
            took = time.time() - record.created_at
            log.info(
                "job %s succeeded: %d images in %.1f s", task.job_id, task.params.num_images, took,
                extra=shard_fields(task, status="succeeded", images=task.params.num_images, duration_ms=ms(took)),
            )  # fmt: skip
            return
        now = await self._patiently("status", lambda: self.store.get(task.job_id), (RedisError,), task)
        if now is not None and now.status == JobStatus.succeeded:
            return
        try:
            await asyncio.to_thread(self.objects.delete_keys, [manifest_key(task.job_id)])
        except STORAGE_ERRORS as e:  # the bucket's lifecycle rule is the backstop
            log.warning("job %s ended before success: its manifest not deleted (%s)", task.job_id, e)

    async def _patiently(self, what: str, call, errors: tuple[type[BaseException], ...], task: ShardTask):
        """await call(), retrying on errors with capped exponential backoff (0.5 s .. 10 s) for up
        to dependency_patience_seconds, or until the consumer drains; then the error propagates.
        Repeating any of these calls is harmless (deterministic object keys, idempotent
        completion and ack)."""
        deadline = time.monotonic() + self.settings.dependency_patience_seconds
        delay = 0.5
        while True:
            try:
                return await call()
            except errors as e:
                if self.stopping.is_set() or time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "shard %s/%d: %s failed (%s); waiting %.1f s for the dependency",
                    task.job_id, task.shard, what, type(e).__name__, delay,
                )  # fmt: skip
                metrics.dependency_waits_total().inc(tags={"step": what})
                await asyncio.sleep(delay)
                delay = min(2 * delay, 10.0)

    def _upload(self, task: ShardTask, result: ShardResult) -> list[tuple[str, int]]:
        """Encode and upload the shard's PNGs, keeping any an earlier or concurrent attempt wrote
        first; returns the (sha256 hex, size) of what the bucket holds, in image order."""
        pixels = np.frombuffer(result.pixels, dtype=np.uint8).reshape(result.shape)
        if pixels.shape[0] != task.count:
            raise RuntimeError(f"Denoiser returned {pixels.shape[0]} images for a shard of {task.count}")

        def upload(k: int) -> tuple[str, int]:
            # the first attempt to write an image wins; the checksums are of what stands
            data = self.objects.put_png_once(
                image_key(task.job_id, task.start + k), png_bytes(pixels[k], compress_level=1)
            )
            return hashlib.sha256(data).hexdigest(), len(data)

        # boto3 clients are thread-safe; uploads overlap their network round trips
        return list(self._uploads.map(upload, range(task.count)))

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

    async def _interrupted(self, message_id: str, task: ShardTask, error: ReplicaLost) -> None:
        """The replica died under the shard (killed, preempted, out of host memory): put the shard
        back without spending an attempt; only a shard that keeps losing replicas counts it."""
        log.warning(
            "shard %s/%d: Denoiser replica lost (%s); putting it back", task.job_id, task.shard, error,
            extra=shard_fields(task, error=f"replica lost: {error}"),
        )  # fmt: skip
        metrics.shard_retries_total().inc(tags={"reason": "replica_lost"})
        await asyncio.sleep(1.0)  # let Serve notice the death and route to a live replica
        await self._put_back_interrupted(message_id, task, f"Denoiser replica lost: {error}")

    async def _put_back_interrupted(self, message_id: str, task: ShardTask, reason: str) -> None:
        """A replica (Denoiser or Worker) died under the shard: back in the queue without spending
        an attempt, unless it has been interrupted max_interruptions times already, after which
        each interruption counts as an attempt (a shard that kills its replicas must end)."""
        if task.interruptions >= self.settings.max_interruptions:
            update = {"last_error": f"{reason} (again)", "last_error_kind": "replica_lost"}
            await self.queue.requeue(message_id, task.model_copy(update=update))
            return
        update = {"interruptions": task.interruptions + 1, "last_error": reason, "last_error_kind": "replica_lost"}
        await self.queue.put_back(message_id, task.model_copy(update=update))

    async def _retry(self, message_id: str, task: ShardTask, reason: str, kind: str) -> None:
        log.warning(
            "shard %s/%d attempt %d failed: %s", task.job_id, task.shard, task.attempt, reason,
            extra=shard_fields(task, error=reason),
        )  # fmt: skip
        metrics.shard_retries_total().inc(tags={"reason": kind})
        await asyncio.sleep(min(0.5 * task.attempt, 5.0))
        await self.queue.requeue(message_id, task.model_copy(update={"last_error": reason, "last_error_kind": kind}))

    async def _fail(self, message_id: str, task: ShardTask, record: JobRecord) -> None:
        """The job first, then the message: if Redis fails in between, the message stays pending,
        is reclaimed, and this runs again (failing an ended job is a no-op), so the job can never
        be left running with its shard already dead-lettered."""
        message = f"shard {task.shard} failed {task.attempt - 1} times; last error: {task.last_error}"
        log.warning("job %s failed: %s", task.job_id, message, extra=shard_fields(task, status="failed", error=message))
        # tenants get what went wrong in words; exception text (Ray, CUDA, addresses) stays in logs
        public = PUBLIC_REASONS.get(task.last_error_kind or "", "an internal error")
        shown = f"shard {task.shard} failed {task.attempt - 1} times: {public}; the service log has the details"
        await self.lifecycle.fail(record, JobError(code="shard_failed", message=shown))
        await self.queue.dead_letter(message_id, {"task": task.model_dump_json()}, message)
