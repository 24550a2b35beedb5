"""The sweeper: deletes the images of jobs that are due to go (service.jobs.purge).

A job is scheduled when it is submitted (for when its record expires), again when it fails or
is canceled (purge_delay_seconds later) and when it is deleted (to catch a straggling upload).
Each Worker replica runs one; deleting is idempotent, so two replicas sweeping the same job is
harmless. A bucket lifecycle rule on the `jobs/` prefix is a backstop for objects that outlive
every schedule (docs/deploy.md)."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from service.jobs.store import JobStore
from service.storage import STORAGE_ERRORS, ObjectStore
from worker.loop import run_until_stopped

log = logging.getLogger("ray.serve")
RETRY_S = 600


class Sweeper:
    def __init__(self, store: JobStore, objects: ObjectStore, interval_s: float = 30.0, batch: int = 100) -> None:
        self.store = store
        self.objects = objects
        self.interval = interval_s
        self.batch = batch
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        # a dependency that is away is tried again next round
        await run_until_stopped(
            "sweeper",
            self._round,
            self.stopping,
            dependency_errors=(RedisError, *STORAGE_ERRORS),
            backoff=(self.interval, self.interval),
            error_wait=self.interval,
        )

    async def _round(self) -> float:
        while await self.sweep_once() == self.batch:
            pass  # a full batch: more may be due
        return self.interval

    async def sweep_once(self, now: float | None = None) -> int:
        """Delete the objects of up to `batch` due jobs; returns how many jobs were due. A job
        whose objects cannot be deleted is tried again RETRY_S later; the others go on."""
        now = time.time() if now is None else now
        due = await self.store.purges.due(now, self.batch)
        swept = []
        for job_id, at in due:
            try:
                count = await asyncio.to_thread(self.objects.delete_job, job_id)
            except STORAGE_ERRORS as e:
                log.warning("sweeper: job %s: %s; trying again in %d s", job_id, type(e).__name__, RETRY_S)
                await self.store.purges.schedule(job_id, now + RETRY_S)
                continue
            if count:
                log.info("sweeper: deleted %d images of job %s", count, job_id)
            await self.store.release_storage(job_id)
            swept.append((job_id, at))
        await self.store.purges.swept(swept)
        return len(due)
