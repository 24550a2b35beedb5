"""Per-key submission quotas: a moving-window rate limit (PyPI `limits`, its Redis storage, so
every ingress replica counts the same window). The jobs-in-flight limit is checked where jobs
are created, in the job store's submit transaction."""

from __future__ import annotations

import math
import time

from fastapi import HTTPException, status
from limits import RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter

from service.jobs.connection import async_options
from service.jobs.keys import PREFIX
from service.settings import Settings


def too_many(detail: str, retry_after: float) -> HTTPException:
    """429 with Retry-After in whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(seconds)})


class SubmissionQuota:
    """At most max_submissions_per_minute_per_key submissions per owner in any 60 s."""

    def __init__(self, settings: Settings) -> None:
        self.per_minute = settings.max_submissions_per_minute_per_key
        self.item = RateLimitItemPerMinute(self.per_minute)
        # the job store's reconnect-and-retry options: without them every pooled connection
        # fails once after a Redis restart, and each failure would be a 503
        storage = RedisStorage(
            f"async+{settings.redis_url}",
            implementation="redispy",
            key_prefix=f"{PREFIX}:quota",
            **async_options(settings.redis_timeout_seconds, decode_responses=False),
        )
        self.limiter = MovingWindowRateLimiter(storage)

    async def spend(self, owner: str) -> None:
        """Count one submission, or raise 429 saying when the window has room again."""
        if await self.limiter.hit(self.item, owner):
            return
        stats = await self.limiter.get_window_stats(self.item, owner)
        raise too_many(
            f"rate limit: at most {self.per_minute} job submissions per minute per API key",
            stats.reset_time - time.time(),
        )
