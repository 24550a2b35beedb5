"""The webhook schedule against the real Redis-compatible server: the transitions schedule
each subscribed event exactly once, claims are exclusive, stale attempts change nothing, and
the retry delays add up to more than an hour."""

from __future__ import annotations

import random

import pytest

from service.jobs import keys
from service.jobs.schemas import JobError, JobStatus, ShardTask
from service.jobs.webhooks import JITTER, MAX_ATTEMPTS, RETRY_SCHEDULE, retry_delay
from tests.service.jobs.test_store import params

URL = "https://hooks.example.com/undiffuse"


def due(store, run) -> dict[str, float]:
    return dict(run(store.r.zrange(keys.WEBHOOKS_DUE, 0, -1, withscores=True)))


def test_retry_delays_grow_exponentially_and_last_over_an_hour():
    delays = [retry_delay(n, 5.0, random.Random(n)) for n in range(1, MAX_ATTEMPTS)]
    assert all(d is not None for d in delays) and retry_delay(MAX_ATTEMPTS, 5.0) is None
    for n, d in enumerate(delays, start=1):
        assert (1 - JITTER) * 5 * RETRY_SCHEDULE[n - 1] <= d <= (1 + JITTER) * 5 * RETRY_SCHEDULE[n - 1]
    assert list(RETRY_SCHEDULE) == sorted(RETRY_SCHEDULE)
    assert (1 - JITTER) * 5.0 * sum(RETRY_SCHEDULE) > 3600  # even the shortest jitter keeps trying > 1 h
    assert retry_delay(1, 0.05, random.Random(0)) < 0.1  # the base scales it (tests run fast)
    with pytest.raises(ValueError):
        retry_delay(0, 5.0)


def test_each_subscribed_transition_schedules_one_delivery_once(store, run):
    job_id, _, _ = run(store.submit("alice", params(4), {}, webhook=(URL, ["started", "failed"])))
    assert due(store, run) == {}  # nothing happened yet
    assert run(store.mark_running(job_id, "alice")) == 1
    assert run(store.mark_running(job_id, "alice")) == 0  # no second `started`
    assert list(due(store, run)) == [f"{job_id}:started"]
    assert run(store.finish(job_id, "alice", JobStatus.failed, JobError(code="x", message="y")))
    assert not run(store.finish(job_id, "alice", JobStatus.canceled))
    assert sorted(due(store, run)) == [f"{job_id}:failed", f"{job_id}:started"]
    record = run(store.get(job_id))
    assert record.webhook_url == URL and record.webhook_events == ["failed", "started"]
    assert [(o.event, o.status, o.attempts) for o in record.webhooks] == [
        ("started", "pending", 0),
        ("failed", "pending", 0),
    ]
    assert 0 < run(store.r.ttl(keys.job_webhooks(job_id))) <= 600  # lives as long as the record


def test_unsubscribed_events_and_jobs_without_a_webhook_schedule_nothing(store, run):
    plain, _, _ = run(store.submit("alice", params(4), {"a": 1}))
    hooked, _, _ = run(store.submit("alice", params(4), {"a": 2}, webhook=(URL, ["succeeded"])))
    for job_id in (plain, hooked):
        run(store.mark_running(job_id, "alice"))
        run(store.finish(job_id, "alice", JobStatus.canceled))
    assert due(store, run) == {}
    assert run(store.get(plain)).webhooks == [] and run(store.get(hooked)).webhooks == []


def test_succeed_schedules_succeeded(store, run):
    job_id, _, _ = run(store.submit("alice", params(2, steps=3), {}, webhook=(URL, ["succeeded"])))
    run(store.complete_shard(ShardTask(job_id=job_id, shard=0, start=0, count=2, params=params(2, steps=3))))
    assert run(store.succeed(job_id, "alice"))
    assert list(due(store, run)) == [f"{job_id}:succeeded"]


def test_a_claim_hides_a_delivery_for_its_lease_and_stale_attempts_are_ignored(store, run):
    job_id, _, _ = run(store.submit("alice", params(4), {}, webhook=(URL, ["canceled"])))
    run(store.finish(job_id, "alice", JobStatus.canceled))
    now = due(store, run)[f"{job_id}:canceled"]
    schedule = store.webhooks
    assert run(schedule.claim(now, 30, 10)) == [(job_id, "canceled")]
    assert run(schedule.claim(now + 1, 30, 10)) == []  # leased: nobody else gets it
    first = run(schedule.begin(job_id, "canceled"))
    assert first.attempts == 1
    assert run(schedule.claim(now + 31, 30, 10)) == [(job_id, "canceled")]  # the lease ran out
    second = run(schedule.begin(job_id, "canceled"))
    assert second.attempts == 2
    first.status, first.delivered_at = "delivered", now
    assert not run(schedule.finish(job_id, first))  # attempt 1 is stale: attempt 2 decides
    second.status, second.next_attempt_at, second.last_status_code = "pending", now + 100, 500
    assert run(schedule.finish(job_id, second))
    assert due(store, run) == {f"{job_id}:canceled": pytest.approx(now + 100)}
    stored = run(store.get(job_id)).webhooks[0]
    assert (stored.status, stored.attempts, stored.last_status_code) == ("pending", 2, 500)


def test_deleting_a_job_removes_its_outcomes_and_pending_deliveries(store, run):
    job_id, _, _ = run(store.submit("alice", params(4), {}, webhook=(URL, ["canceled"])))
    other, _, _ = run(store.submit("alice", params(4), {"b": 1}, webhook=(URL, ["canceled"])))
    for j in (job_id, other):
        run(store.finish(j, "alice", JobStatus.canceled))
    assert run(store.delete(job_id, "alice")) == JobStatus.canceled
    assert list(due(store, run)) == [f"{other}:canceled"]
    assert not run(store.r.exists(keys.job_webhooks(job_id)))
