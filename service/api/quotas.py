"""Per-owner quotas counted in Redis by PyPI `limits`, so every ingress replica counts the same
windows: submissions a minute and reads a minute (moving windows), image-steps a day (a fixed
window, the day UTC). The jobs and image-steps in flight are checked where jobs are created, in
the job store's submit transaction."""

from __future__ import annotations

import math
import time

from fastapi import HTTPException, status
from limits import RateLimitItemPerDay, RateLimitItemPerMinute
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter

from service.jobs.connection import async_options
from service.jobs.redis_keys import PREFIX
from service.settings import Settings


def too_many(detail: str, retry_after: float) -> HTTPException:
    """429 with Retry-After in whole seconds (at least 1)."""
    seconds = max(1, math.ceil(retry_after))
    return HTTPException(status.HTTP_429_TOO_MANY_REQUESTS, detail, headers={"Retry-After": str(seconds)})


def quota_storage(settings: Settings) -> RedisStorage:
    """The limiters' Redis, with the job store's reconnect-and-retry options: without them every
    pooled connection fails once after a Redis restart, and each failure would be a 503."""
    return RedisStorage(
        f"async+{settings.redis_url}",
        implementation="redispy",
        key_prefix=f"{PREFIX}:quota",
        **async_options(settings.redis_timeout_seconds, decode_responses=False),
    )


class PerMinuteQuota:
    """At most `per_minute` requests of one kind per owner in any 60 s (a moving window with a
    counter of its own, `namespace`, whatever the number); past it, 429 saying `refusal` and
    when the window has room again."""

    def __init__(self, per_minute: int, namespace: str, refusal: str, storage: RedisStorage) -> None:
        self.per_minute = per_minute
        self.item = RateLimitItemPerMinute(per_minute, namespace=namespace)
        self.refusal = refusal
        self.limiter = MovingWindowRateLimiter(storage)

    async def spend(self, owner: str) -> None:
        if await self.limiter.hit(self.item, owner):
            return
        stats = await self.limiter.get_window_stats(self.item, owner)
        raise too_many(f"rate limit: {self.refusal}", stats.reset_time - time.time())


def submission_quota(settings: Settings, storage: RedisStorage | None = None) -> PerMinuteQuota:
    """At most max_submissions_per_minute_per_key submissions per owner in any 60 s."""
    n = settings.max_submissions_per_minute_per_key
    return PerMinuteQuota(
        n, "SUBMIT", f"at most {n} job submissions per minute per API key", storage or quota_storage(settings)
    )


def read_quota(settings: Settings, storage: RedisStorage | None = None) -> PerMinuteQuota:
    """At most max_reads_per_minute_per_key reads (job views, lists, streams, downloads, the
    model list) per owner in any 60 s: polling faster than that gets 429 (the event stream tells
    the same without polling)."""
    n = settings.max_reads_per_minute_per_key
    return PerMinuteQuota(
        n,
        "READ",
        f"at most {n} reads per minute per API key; follow a job with GET /v1/jobs/{{id}}/events instead of polling",
        storage or quota_storage(settings),
    )


class DailyCostQuota:
    """At most max_cost_per_day_per_key image-steps submitted per owner per day (UTC). A job
    is checked before it is queued and counted once it is (a refused or replayed submission
    spends nothing); concurrent submissions may pass the check together, by at most their own
    cost."""

    def __init__(self, settings: Settings, storage: RedisStorage | None = None) -> None:
        self.per_day = settings.max_cost_per_day_per_key
        self.item = RateLimitItemPerDay(self.per_day, namespace="COST")
        self.limiter = FixedWindowRateLimiter(storage or quota_storage(settings))

    async def check(self, owner: str, cost: int) -> None:
        today = _utc_day()
        if await self.limiter.test(self.item, owner, today, cost=cost):
            return
        stats = await self.limiter.get_window_stats(self.item, owner, today)
        raise too_many(
            f"quota: at most {self.per_day:,} image-steps per day (UTC) per API key; {stats.remaining:,} are left "
            f"today and this job costs {cost:,}",
            _seconds_to_midnight(),
        )

    async def spend(self, owner: str, cost: int) -> None:
        await self.limiter.hit(self.item, owner, _utc_day(), cost=cost)


def _utc_day() -> str:
    """The window's name: a counter per owner and UTC date, so the day starts at midnight UTC
    (a window opened by the day's first job would run 24 h from it)."""
    return time.strftime("%Y-%m-%d", time.gmtime())


def _seconds_to_midnight() -> float:
    return 86400 - time.time() % 86400
