"""The one place where a job starts or reaches a terminal state, and where that has its side
effects: metrics, and the job's events and webhook deliveries (appended and scheduled by the
store's transition scripts themselves, service.jobs.events and service.jobs.webhook_schedule: a side
effect that must happen exactly once with the transition is written in the same script).

Every terminal transition goes through `JobLifecycle`: success once every shard is done and the
manifest is written (the worker), failure when a shard runs out of attempts (the worker), cancel
(the API). The transition itself is a guarded Lua script in the store, so each job ends exactly
once, and the side effects run only for the call that ended it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.jobs.records import JobError, JobStatus, ShardTask
from service.jobs.store import JobFinished, JobRecord, JobStore


@dataclass(frozen=True)
class JobEnded:
    """A job reached a terminal status; duration is from submission to the end."""

    job_id: str
    status: JobStatus
    duration_s: float


@dataclass(frozen=True)
class JobStarted:
    """A job's first shard started; wait_s is the time it spent queued."""

    job_id: str
    wait_s: float


Listener = Callable[[JobStarted | JobEnded], None]
log = logging.getLogger("ray.serve")


def record_metrics(event: JobStarted | JobEnded) -> None:
    """The default listener: the job counters and histograms (service.metrics)."""
    from service import metrics

    if isinstance(event, JobEnded):
        metrics.jobs_total().inc(tags={"status": event.status.value})
        metrics.job_duration_seconds().observe(event.duration_s, tags={"status": event.status.value})
    else:
        metrics.queue_wait_seconds().observe(event.wait_s)


class JobLifecycle:
    def __init__(
        self, store: JobStore, listeners: list[Listener] | None = None, purge_delay_seconds: float = 60.0
    ) -> None:
        self.store = store
        self.listeners = listeners if listeners is not None else [record_metrics]
        self.purge_delay = purge_delay_seconds

    def _emit(self, event: JobStarted | JobEnded) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a side effect must never undo or repeat the transition itself
                log.exception("job %s: listener %r failed on %s", event.job_id, listener, type(event).__name__)

    async def start(self, record: JobRecord) -> bool:
        """Mark the job running for one of its shards. False if the job already ended."""
        outcome = await self.store.mark_running(record.id, record.owner)
        if outcome == 1:
            self._emit(JobStarted(record.id, max(0.0, time.time() - record.created_at)))
        return outcome >= 0

    async def complete_shard(
        self, task: ShardTask, record: JobRecord, files: list[tuple[str, int]] | None = None
    ) -> bool:
        """Record a shard's images as done (idempotent), with their PNGs' (sha256, size); True
        when every shard of the still active job is done: write the manifest, then `succeed`."""
        _status, all_done = await self.store.complete_shard(task, files)
        return all_done

    async def succeed(self, record: JobRecord) -> bool:
        """Move the job, all of its shards done, to succeeded; False if it had already ended."""
        if not await self.store.succeed(record.id, record.owner):
            return False
        self._emit(JobEnded(record.id, JobStatus.succeeded, time.time() - record.created_at))
        return True

    async def fail(self, record: JobRecord, error: JobError) -> bool:
        """Fail an active job and have its images deleted; False if it had already ended."""
        if not await self.store.finish(record.id, record.owner, JobStatus.failed, error):
            return False
        await self._purge_soon(record.id)
        self._emit(JobEnded(record.id, JobStatus.failed, time.time() - record.created_at))
        return True

    async def _purge_soon(self, job_id: str) -> None:
        """A failed or canceled job's images are deleted after purge_delay (shards still uploading
        land first). Should this write fail, they go when the record expires."""
        try:
            await self.store.purges.schedule(job_id, time.time() + self.purge_delay)
        except Exception:
            log.exception("job %s: could not schedule the deletion of its images", job_id)

    async def cancel(self, job_id: str, owner: str) -> JobRecord:
        """Cancel the owner's active job and return its record: a queued job never runs, a
        running one stops at its next denoising step. JobNotFound / JobFinished otherwise."""
        await self.store.get_owned(job_id, owner)
        if not await self.store.finish(job_id, owner, JobStatus.canceled):
            raise JobFinished((await self.store.get_owned(job_id, owner)).status)
        await self._purge_soon(job_id)
        record = await self.store.get_owned(job_id, owner)
        end = record.finished_at if record.finished_at is not None else time.time()
        self._emit(JobEnded(job_id, JobStatus.canceled, end - record.created_at))
        return record
