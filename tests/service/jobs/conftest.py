"""Job-store and queue tests run against the real Redis-compatible server, in their own
database (the stack's workers use database 0 and never see it), without Ray."""

from __future__ import annotations

import pytest

from service.jobs.store import JobStore

DB = 7


@pytest.fixture
def store(redis_server, run) -> JobStore:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    store = JobStore.from_url(url, ttl_seconds=600, shard_size=4)
    run(store.r.flushdb())
    yield store
    run(store.r.flushdb())
    run(store.close())
