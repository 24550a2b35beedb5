"""Redis clients for the job store and the queue: redis-py reconnects and retries a command
on a dropped or stale connection (e.g. after a Redis restart) before giving up."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def _client_options(timeout: float) -> dict:
    return dict(
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        decode_responses=True,
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        health_check_interval=30,
    )


def async_options(timeout: float, decode_responses: bool = True) -> dict:
    """Options of an asyncio client (for clients another library builds, e.g. `limits`)."""
    from redis.asyncio.retry import Retry

    return {
        **_client_options(timeout),
        "decode_responses": decode_responses,
        "retry": Retry(ExponentialBackoff(cap=0.5, base=0.05), 3),
    }


def async_redis(url: str, timeout: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, **async_options(timeout))


def sync_redis(url: str, timeout: float) -> redis.Redis:
    from redis.retry import Retry

    return redis.Redis.from_url(url, retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 3), **_client_options(timeout))
