"""Decisions of the autoscaling policy: replicas from the backlog's cost and the replicas'
measured throughput (unit tests; one against the real Redis-compatible server)."""

from types import SimpleNamespace

import pytest

from service.autoscaling import BacklogPolicy, desired_replicas


def _want(backlog, rate, lo=1, hi=100, target=60.0):
    return desired_replicas(backlog, rate, drain_target_seconds=target, min_replicas=lo, max_replicas=hi)


def test_empty_queue_scales_to_the_minimum():
    assert _want(0, 1000, lo=1) == 1
    assert _want(0, 1000, lo=0) == 0


def test_replicas_serve_the_backlog_within_the_target():
    # 1,000 row-steps/s per replica, 60 s target: 60,000 row-steps per replica
    counts = [_want(b, 1000) for b in (1, 60_000, 60_001, 240_000, 240_001)]
    assert counts == [1, 1, 2, 4, 5]
    # a faster replica needs fewer of them for the same backlog; a tighter target needs more
    assert _want(240_000, 4000) == 1
    assert _want(240_000, 1000, target=15) == 16


def test_any_backlog_asks_for_a_replica_before_a_throughput_is_known():
    assert _want(1, 0.0, lo=0) == 1
    assert _want(10**9, 0.0, lo=0) == 1


def test_bounds_are_respected():
    assert _want(10**9, 1000, hi=6) == 6
    assert _want(1, 1000, lo=3, hi=6) == 3
    with pytest.raises(ValueError):
        desired_replicas(1, 1, drain_target_seconds=0, min_replicas=1, max_replicas=2)


def _ctx(requests=0.0, target=2, lo=1, hi=8):
    return SimpleNamespace(
        total_num_requests=requests,
        target_num_replicas=target,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
    )


def test_policy_reads_the_queue_and_caches_it():
    reads = []

    class Fake(BacklogPolicy):
        def _read(self):
            reads.append(1)
            return 0, {"alice": 100_000.0, "bob": 200_000.0}, 1000.0

    policy = Fake(drain_target_seconds=60, owner_share=1.0, refresh_s=60)
    assert policy(_ctx()) == (5, {"backlog": 300_000, "throughput_per_replica": 1000.0})
    assert policy(_ctx(hi=3))[0] == 3
    assert len(reads) == 1  # cached between refreshes


def test_policy_keeps_the_current_target_when_redis_is_unreachable():
    class Down(BacklogPolicy):
        def _read(self):
            raise ConnectionError("redis down")

    assert Down()(_ctx(target=3)) == (3, {"backlog": None})


def test_policy_against_real_redis(stack):
    """The policy's own Redis read, against the test stack's server."""
    policy = BacklogPolicy(drain_target_seconds=60, refresh_s=0, redis_url=stack.redis.url)
    decision, state = policy(_ctx(lo=1, hi=8))
    assert state["backlog"] >= 0 and state["throughput_per_replica"] >= 0 and 1 <= decision <= 8


def test_one_owner_alone_scales_to_its_share_and_others_add_beyond_it():
    """owner_share 0.5 of 8 replicas at 1,000 row-steps/s and 60 s: one owner's waiting cost
    counts up to 240,000 row-steps (4 replicas), however much it queues."""

    class Queue(BacklogPolicy):
        waiting: dict = {}

        def _read(self):
            return 10_000, self.waiting, 1000.0

    policy = Queue(drain_target_seconds=60, owner_share=0.5, refresh_s=0)
    policy.waiting = {"flood": 10**9}
    assert policy(_ctx(hi=8))[0] == 5  # 240,000 waiting + 10,000 in flight
    policy.waiting = {"flood": 10**9, "other": 100_000.0}
    assert policy(_ctx(hi=8))[0] == 6  # the other owner's work still adds its replicas
    policy.waiting = {"a": 10**9, "b": 10**9, "c": 10**9}
    assert policy(_ctx(hi=8))[0] == 8  # many owners: up to the maximum
    with pytest.raises(ValueError):
        BacklogPolicy(owner_share=0)
