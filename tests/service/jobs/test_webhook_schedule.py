"""The webhook schedule against the real Redis-compatible server: the transitions schedule
each subscribed event exactly once, claims are exclusive, stale attempts change nothing, and
the retry delays add up to more than an hour."""

from __future__ import annotations

import random

import pytest

from service.jobs import redis_keys
from service.jobs.records import JobError, JobStatus, ShardTask
from service.jobs.webhook_schedule import (
    JITTER,
    MAX_ATTEMPTS,
    RETRY_SCHEDULE,
    WEBHOOKS_PARKED,
    WEBHOOKS_PARKED_PREFIX,
    Claim,
    Delivery,
    retry_delay,
)
from tests.service.jobs.test_store import params

URL = "https://hooks.example.com/undiffuse"


def due(store, run) -> dict[str, float]:
    return dict(run(store.r.zrange(redis_keys.WEBHOOKS_DUE, 0, -1, withscores=True)))


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
    assert 0 < run(store.r.ttl(redis_keys.job_webhooks(job_id))) <= 600  # lives as long as the record


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
    assert run(schedule.claim(now, 30, 10)) == Claim([Delivery(job_id, "canceled", "alice")], False)
    assert run(schedule.claim(now + 1, 30, 10)).deliveries == []  # leased: nobody else gets it
    first = run(schedule.begin(job_id, "canceled"))
    assert first.attempts == 1
    assert run(schedule.claim(now + 31, 30, 10)).deliveries == [(job_id, "canceled", "alice")]  # the lease ran out
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
    assert not run(store.r.exists(redis_keys.job_webhooks(job_id)))


# --- fair claims ---------------------------------------------------------------------------------
def canceled(store, run, owner: str, n: int) -> list[str]:
    """n jobs of owner, each canceled: one `canceled` delivery due per job, in this order."""
    jobs = []
    for _ in range(n):
        job_id, _, _ = run(store.submit(owner, params(4), {"n": len(jobs), "o": owner}, webhook=(URL, ["canceled"])))
        run(store.finish(job_id, owner, JobStatus.canceled))
        jobs.append(job_id)
    return jobs


def test_a_claim_takes_each_owner_up_to_its_limit_and_parks_the_rest(store, run):
    """Alice's 30 deliveries came due first; with 4 per owner, a claim of 10 takes 4 of hers and
    Bob's, and parks the rest of hers, which then no longer stand in front of anyone's."""
    alice, bob = canceled(store, run, "alice", 30), canceled(store, run, "bob", 1)
    now = max(due(store, run).values()) + 1
    claim = run(store.webhooks.claim(now, 30, 10, per_owner=4, in_flight={}))
    assert claim == Claim(
        [Delivery(j, "canceled", "alice") for j in alice[:4]] + [Delivery(bob[0], "canceled", "bob")], False
    )
    assert run(store.r.zcard(WEBHOOKS_PARKED_PREFIX + "alice")) == 26
    assert list(run(store.r.zrange(WEBHOOKS_PARKED, 0, -1))) == ["alice"]
    assert sorted(due(store, run)) == sorted(f"{j}:canceled" for j in [*alice[:4], *bob])  # leased, not parked
    # while alice has 4 in flight with this caller, her parked deliveries stay parked
    assert run(store.webhooks.claim(now, 30, 10, per_owner=4, in_flight={"alice": 4, "bob": 1})).deliveries == []
    # another dispatcher (nothing in flight) gets hers, oldest first, up to the limit
    again = run(store.webhooks.claim(now, 30, 10, per_owner=4, in_flight={"bob": 1}))
    assert again.deliveries == [Delivery(j, "canceled", "alice") for j in alice[4:8]]
    assert run(store.r.zcard(WEBHOOKS_PARKED_PREFIX + "alice")) == 22


def test_a_new_owners_delivery_is_claimed_past_a_backlog_of_thousands(store, run):
    """Claims cost what they move, not the backlog: the first parks the backlog a page at a time
    (Claim.more until it has looked at everything), and later ones go past it at once."""
    r = store.r
    members = {f"{i:032x}:canceled": 1000.0 + i for i in range(3000)}  # due long ago
    for job_id in {m.split(":")[0] for m in members}:
        run(r.hset(redis_keys.job(job_id), "owner", "alice"))
    run(r.zadd(redis_keys.WEBHOOKS_DUE, members))
    bob = canceled(store, run, "bob", 1)[0]
    now = max(due(store, run).values()) + 1
    claims = []
    while not claims or claims[-1].more:
        claims.append(run(store.webhooks.claim(now, 30, 16, per_owner=4, in_flight={"alice": 4}, scan=1000)))
    assert [c.more for c in claims] == [True, True, True, False]
    assert [d for c in claims for d in c.deliveries] == [Delivery(bob, "canceled", "bob")]
    assert run(r.zcard(WEBHOOKS_PARKED_PREFIX + "alice")) == 3000
    later = canceled(store, run, "carol", 1)[0]
    at = due(store, run)[f"{later}:canceled"] + 0.5  # Bob's delivery is still leased
    claim = run(store.webhooks.claim(at, 30, 16, per_owner=4, in_flight={"alice": 4, "bob": 1}, scan=1000))
    assert claim == Claim([Delivery(later, "canceled", "carol")], False)


def test_a_parked_delivery_of_a_deleted_job_is_claimed_for_dropping(store, run):
    job_id = canceled(store, run, "alice", 1)[0]
    now = due(store, run)[f"{job_id}:canceled"] + 1
    assert run(store.webhooks.claim(now, 30, 10, per_owner=1, in_flight={"alice": 1})).deliveries == []  # parked
    assert run(store.delete(job_id, "alice"))
    claim = run(store.webhooks.claim(now, 30, 10, per_owner=1, in_flight={}))
    assert claim.deliveries == [(job_id, "canceled", "alice")]
    assert run(store.webhooks.begin(job_id, "canceled")) is None  # nothing to send: the dispatcher drops it
    run(store.webhooks.drop(job_id, "canceled"))
    assert due(store, run) == {} and run(store.r.exists(WEBHOOKS_PARKED, WEBHOOKS_PARKED_PREFIX + "alice")) == 0


def test_a_due_entry_whose_job_is_gone_is_claimed_whatever_the_limits(store, run):
    run(store.r.zadd(redis_keys.WEBHOOKS_DUE, {f"{'f' * 32}:canceled": 1.0}))
    claim = run(store.webhooks.claim(2.0, 30, 10, per_owner=1, in_flight={"": 5}))
    assert claim.deliveries == [Delivery("f" * 32, "canceled", "")]
