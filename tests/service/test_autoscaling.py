"""Decisions of the backlog autoscaling policy (unit tests; no servers)."""

from types import SimpleNamespace

import pytest

from service.autoscaling import BacklogPolicy, desired_replicas


def test_empty_queue_scales_to_the_minimum():
    assert desired_replicas(0, 0, shards_per_replica=4, min_replicas=1, max_replicas=8) == 1
    assert desired_replicas(0, 0, shards_per_replica=4, min_replicas=0, max_replicas=8) == 0


def test_growing_backlog_adds_replicas():
    counts = [
        desired_replicas(b, 0, shards_per_replica=4, min_replicas=1, max_replicas=100) for b in (1, 4, 5, 16, 17, 40)
    ]
    assert counts == [1, 1, 2, 4, 5, 10]
    assert counts == sorted(counts)
    # shards already being sampled count as work too
    assert desired_replicas(4, 4, shards_per_replica=4, min_replicas=1, max_replicas=100) == 2


def test_bounds_are_respected():
    assert desired_replicas(10_000, 0, shards_per_replica=4, min_replicas=1, max_replicas=6) == 6
    assert desired_replicas(1, 0, shards_per_replica=4, min_replicas=3, max_replicas=6) == 3
    with pytest.raises(ValueError):
        desired_replicas(1, 0, shards_per_replica=0, min_replicas=1, max_replicas=2)


def _ctx(requests=0.0, target=2, lo=1, hi=8):
    return SimpleNamespace(
        total_num_requests=requests,
        target_num_replicas=target,
        capacity_adjusted_min_replicas=lo,
        capacity_adjusted_max_replicas=hi,
    )


def test_policy_reads_backlog_and_caches_it():
    reads = []

    class Fake(BacklogPolicy):
        def _read_backlog(self):
            reads.append(1)
            return 30

    policy = Fake(shards_per_replica=4, refresh_s=60)
    assert policy(_ctx()) == (8, {"backlog": 30})
    assert policy(_ctx(hi=5)) == (5, {"backlog": 30})
    assert len(reads) == 1  # cached between refreshes


def test_policy_keeps_the_current_target_when_redis_is_unreachable():
    class Down(BacklogPolicy):
        def _read_backlog(self):
            raise ConnectionError("redis down")

    assert Down()(_ctx(target=3)) == (3, {"backlog": None})


def test_policy_against_real_redis(stack):
    """The policy's own Redis read, against the test stack's server."""
    policy = BacklogPolicy(shards_per_replica=4, refresh_s=0, redis_url=stack.redis.url)
    decision, state = policy(_ctx(lo=1, hi=8))
    assert state["backlog"] >= 0 and 1 <= decision <= 8
