"""The purge schedule: when each job's objects are deleted from the bucket (worker.sweeper).

One sorted set (service.jobs.redis_keys.PURGE), job id -> epoch seconds when its objects go. A
job is scheduled when it is submitted, in the submission's transaction (for when its record
expires), again when it fails or is canceled (service.jobs.lifecycle: purge_delay_seconds
later, so a straggling upload lands first) and when it is deleted (service.api.jobs: to catch
a straggling upload). Scheduling a job again moves its entry; the sweeper removes an entry only
if it is still due when the sweep ends, so a reschedule made while a sweep ran is kept.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from service.jobs import redis_keys
from service.jobs.scripts import Script

# due: (job id, due time) pairs, flattened. Removes each entry still due then.
_UNSCHEDULE = Script(
    """
for i = 1, #due, 2 do
  local at = redis.call('ZSCORE', schedule, due[i])
  if at and tonumber(at) == tonumber(due[i + 1]) then redis.call('ZREM', schedule, due[i]) end
end
return 0
""",
    keys=["schedule"],
    args=["*due"],
)


class PurgeSchedule:
    """The schedule on one Redis client (the job store's)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._unschedule = _UNSCHEDULE.register(client)

    async def schedule(self, job_id: str, at: float) -> None:
        """Have the job's objects deleted at epoch time `at`."""
        await self.r.zadd(redis_keys.PURGE, {job_id: at})

    def schedule_in(self, pipe: aioredis.client.Pipeline, job_id: str, at: float) -> None:
        """`schedule`, buffered in the caller's transaction."""
        pipe.zadd(redis_keys.PURGE, {job_id: at})

    async def due(self, now: float, count: int) -> list[tuple[str, float]]:
        """Up to count (job id, due time) whose time has come, earliest first."""
        return list(await self.r.zrangebyscore(redis_keys.PURGE, "-inf", now, start=0, num=count, withscores=True))

    async def swept(self, due: list[tuple[str, float]]) -> None:
        """Remove swept entries, unless rescheduled meanwhile (a DELETE's later sweep stays)."""
        if due:
            await self._unschedule(schedule=redis_keys.PURGE, due=[v for job_id, at in due for v in (job_id, repr(at))])
