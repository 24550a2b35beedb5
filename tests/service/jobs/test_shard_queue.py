"""ShardQueue against the real Redis-compatible server: fair admission by capacity, leases,
settling, reclaim, position. The only code that touches the queue's keys."""

from __future__ import annotations

import time

import redis

from service.jobs import redis_keys
from service.jobs.queue import ShardQueue, holders, shard_cost, totals
from service.jobs.records import JobParams, ShardTask

P = JobParams(model="mnist", num_images=8, steps=2, sampler="ddim", eta=0.0, seed=1, class_label=1, guidance_scale=1.0)
FAR = 2**62  # a lease deadline that never passes


def tasks(n: int, owner: str = "a", job: str = "j", count: int = 4, steps: int = 2, guided=False) -> list[ShardTask]:
    params = P.model_copy(update={"steps": steps, "guidance_scale": 3.0 if guided else 1.0})
    return [ShardTask(job_id=job, shard=k, start=count * k, count=count, owner=owner, params=params) for k in range(n)]


def enqueue(queue: ShardQueue, run, items: list[ShardTask], job_key: str | None = None) -> None:
    async def go():
        async with queue.r.pipeline(transaction=True) as pipe:
            pipe.multi()
            await queue.enqueue(pipe, job_key or redis_keys.job(items[0].job_id), items[0].owner, items)
            await pipe.execute()

    run(go())


def read(queue: ShardQueue, run, window: int = 1000, count: int = 64, deadline: int = FAR, hard: int | None = None):
    return run(queue.read("c", deadline, window, hard=hard, count=count))


def test_enqueue_then_read_delivers_each_task_once(store, run):
    q = store.queue
    enqueue(q, run, tasks(3))
    assert run(q.depth()) == 3
    got = read(q, run)
    assert [m.task for m in got] == tasks(3)
    assert read(q, run) == []  # leased: delivered once
    t = run(q.totals())
    assert (t.waiting, t.inflight, t.inflight_rows, t.inflight_cost, t.owners) == (0, 3, 12, 24, 1)


def test_cost_counts_rows_and_steps_twice_with_guidance():
    assert shard_cost(tasks(1, count=4, steps=10)[0]) == (40, 4)
    assert shard_cost(tasks(1, count=4, steps=10, guided=True)[0]) == (80, 8)


def test_ack_settles_once_and_empties_the_queue(store, run):
    q = store.queue
    enqueue(q, run, tasks(2))
    first, second = read(q, run)
    assert run(q.ack(first.id)) and not run(q.ack(first.id))  # a second settle is a no-op
    assert run(q.depth()) == 1
    run(q.ack(second.id))
    t = run(q.totals())
    assert (t.shards, t.cost, t.inflight_rows, t.owners) == (0, 0, 0, 0)
    assert (
        run(q.r.exists(redis_keys.QUEUE_OWNER_PREFIX + "a", redis_keys.owner_shards("a"), redis_keys.QUEUE_MESSAGES))
        == 0
    )


def test_requeue_puts_the_next_attempt_at_the_head_of_its_owner(store, run):
    q = store.queue
    enqueue(q, run, tasks(3))
    (msg,) = read(q, run, count=1)
    assert run(q.requeue(msg.id, msg.task.model_copy(update={"last_error": "oops"})))
    t = run(q.totals())
    assert (t.waiting, t.waiting_cost, t.inflight, t.inflight_rows, t.inflight_cost) == (3, 24, 0, 0, 0)
    assert run(q.r.hget(redis_keys.QUEUE_OWNER_PREFIX + "a", "held")) == "0"
    again = read(q, run)
    assert again[0].id != msg.id and again[0].task.attempt == 2 and again[0].task.last_error == "oops"
    assert [m.task.shard for m in again] == [0, 1, 2]  # the retry first, then the owner's order
    assert not run(q.ack(msg.id))  # the old delivery's token settles nothing


def test_dead_letter_moves_the_shard_with_its_reason(store, run):
    q = store.queue
    enqueue(q, run, tasks(1))
    (msg,) = read(q, run)
    run(q.dead_letter(msg.id, msg.fields, "out of attempts"))
    assert run(q.depth()) == 0
    (dead,) = run(q.r.xrange(redis_keys.DEAD_LETTER_STREAM))
    assert dead[1] == {**msg.fields, "reason": "out of attempts"}


def test_reclaim_takes_over_expired_leases_and_heartbeats_prevent_it(store, run, redis_server):
    q = store.queue
    enqueue(q, run, tasks(2))
    now = int(time.time() * 1000)
    beating, silent = read(q, run, deadline=now + 300)
    assert run(q.heartbeat(beating.id, now + 60_000))
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/7", decode_responses=True)
    assert sorted(h[0] for h in holders(client)) == ["c", "c"]
    claimed = run(q.reclaim("rescuer", now + 400, now + 60_000))
    assert sorted(h[0] for h in holders(client)) == ["c", "rescuer"]
    assert [m.task for m in claimed] == [silent.task] and claimed[0].id != silent.id
    assert run(q.reclaim("rescuer", now + 400, now + 60_000)) == []  # the new lease runs a minute
    # the silent Worker's late settle and heartbeat are refused: the shard is the rescuer's now
    assert not run(q.ack(silent.id)) and not run(q.heartbeat(silent.id, now + 60_000))
    assert run(q.put_back(claimed[0].id, claimed[0].task.model_copy(update={"interruptions": 1})))
    (back,) = read(q, run)
    assert back.task.shard == silent.task.shard and back.task.interruptions == 1 and back.task.attempt == 1


def test_reclaim_pages_through_many_expired_leases(store, run):
    q = store.queue
    enqueue(q, run, tasks(5))
    now = int(time.time() * 1000)
    read(q, run, deadline=now)
    pages = [run(q.reclaim("rescuer", now + 1, FAR, count=2)) for _ in range(3)]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(m.task.shard for p in pages for m in p) == [0, 1, 2, 3, 4]  # each once


def test_the_window_bounds_rows_in_flight(store, run):
    q = store.queue
    enqueue(q, run, tasks(10, count=4))
    assert len(read(q, run, window=10)) == 2  # 8 rows; a third shard would make 12
    assert read(q, run, window=10) == []
    t = run(q.totals())
    assert (t.inflight_rows, t.waiting) == (8, 8)


def test_a_newcomer_is_admitted_past_a_full_window_and_first(store, run):
    q = store.queue
    enqueue(q, run, tasks(10, owner="big", job="b"))
    assert len(read(q, run, window=16)) == 4  # the window is full of big's shards
    enqueue(q, run, tasks(1, owner="small", job="s", count=1))
    (got,) = read(q, run, window=16)  # up to the hard ceiling, one shard of an owner holding nothing
    assert got.task.owner == "small"
    assert read(q, run, window=16) == []


def test_an_owner_keeps_to_its_share_while_others_wait(store, run):
    """The per-owner cap: with two owners present, neither holds more than half the window
    (once its shards settle, it is not readmitted past its share)."""
    q = store.queue
    enqueue(q, run, tasks(20, owner="a", job="a"))
    first = read(q, run, window=32)
    assert len(first) == 8  # alone, a takes the whole window
    enqueue(q, run, tasks(20, owner="b", job="b"))
    for m in first:
        run(q.ack(m.id))
    got = read(q, run, window=32)
    by_owner = {o: sum(m.task.count for m in got if m.task.owner == o) for o in ("a", "b")}
    assert by_owner == {"a": 16, "b": 16}


def test_deficit_round_robin_shares_rows_between_backlogs_of_any_size(store, run):
    """Three owners with backlogs of 300, 100 and 40 shards of different costs: while all three
    wait, each is served the same cost (row-steps) within 10 %."""
    q = store.queue
    enqueue(q, run, tasks(300, owner="a", job="a", count=4, steps=10))  # cost 40 each
    enqueue(q, run, tasks(100, owner="b", job="b", count=2, steps=50))  # cost 100 each
    enqueue(q, run, tasks(40, owner="c", job="c", count=8, steps=50, guided=True))  # cost 800 each
    q.quantum = 800  # the largest shard
    served = {"a": 0, "b": 0, "c": 0}
    waiting = {"a": 300, "b": 100, "c": 40}
    while all(waiting.values()):
        got = read(q, run, window=10_000, count=1)
        for m in got:
            cost, _rows = shard_cost(m.task)
            served[m.task.owner] += cost
            waiting[m.task.owner] -= 1
            run(q.ack(m.id))
    mean = sum(served.values()) / 3
    assert all(abs(v - mean) <= 0.1 * mean for v in served.values()), served


def test_position_counts_down_and_the_estimate_never_grows(store, run):
    q = store.queue
    enqueue(q, run, tasks(10, owner="a", job="a1", count=4, steps=10))  # 400 row-steps before a2
    enqueue(q, run, tasks(2, owner="a", job="a2", count=4, steps=10))
    enqueue(q, run, tasks(100, owner="b", job="b1", count=4, steps=10))
    now = time.time()
    ahead, start = run(q.position(redis_keys.job("a2"), "a", now, throughput=100.0))
    assert ahead == 400 + 400  # its owner's 400, and as much of b's
    assert abs(start - (now + 8.0)) < 1e-3  # Lua keeps 14 significant digits
    admitted = read(q, run, window=16)  # two of a's, two of b's
    ahead2, start2 = run(q.position(redis_keys.job("a2"), "a", now + 1, throughput=10.0))  # slower now
    assert ahead2 == 2 * (400 - 80) and start2 == start  # the estimate is never pushed back
    enqueue(q, run, tasks(50, owner="c", job="c1", count=4, steps=10))  # a newcomer arrives
    ahead3, _ = run(q.position(redis_keys.job("a2"), "a", now + 2, throughput=100.0))
    assert ahead3 == ahead2  # kept from growing
    for m in admitted:
        run(q.ack(m.id))


def test_totals_are_read_with_a_sync_client(store, run, redis_server):
    q = store.queue
    enqueue(q, run, tasks(3))
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/7", decode_responses=True)
    assert totals(client).shards == run(q.depth()) == 3
    assert totals(client).cost == 3 * 8


def test_a_wake_up_follows_a_submission(store, run):
    q = store.queue
    assert not run(q.wait_for_work(0.05))
    enqueue(q, run, tasks(1))
    assert run(q.wait_for_work(0.05))


def test_a_newcomer_goes_to_the_head_of_the_round(store, run):
    q = store.queue
    enqueue(q, run, tasks(10, owner="big", job="b"))
    assert read(q, run, count=1)[0].task.owner == "big"  # big's visit is not over
    enqueue(q, run, tasks(1, owner="small", job="s", count=1))
    assert read(q, run, count=1)[0].task.owner == "small"  # it goes first all the same


def test_owners_that_only_hold_shards_leave_the_window_to_those_waiting(store, run):
    """Ten owners each hold a shard and have nothing waiting: the one owner with work waiting
    may fill the rest of the window (the share is per owner waiting)."""
    q = store.queue
    for k in range(10):
        enqueue(q, run, tasks(1, owner=f"o{k}", job=f"j{k}", count=4))
    assert len(read(q, run, window=128)) == 10  # 40 rows held
    enqueue(q, run, tasks(100, owner="a", job="a", count=4))
    got = read(q, run, window=128)
    assert len(got) == 22 and {m.task.owner for m in got} == {"a"}  # 40 + 88 = 128 rows


def test_a_retried_admit_returns_the_same_leases(store, run):
    """A client retry of an admit whose reply was lost (same request nonce) gets the leases it
    was given, instead of admitting more that nobody would hold."""
    q = store.queue
    enqueue(q, run, tasks(4))
    call = dict(
        deadline=FAR, window=1000, hard=2000, max_count=2, quantum=q.quantum, max_visits=512, consumer="c", nonce="n-1"
    )
    first = run(q._admit(**call))
    again = run(q._admit(**call))
    assert first == again and len(first) == 4  # two (token, task) pairs
    t = run(q.totals())
    assert (t.inflight, t.waiting) == (2, 2)


def test_a_resent_submission_queues_its_shards_once(store, run):
    q = store.queue
    enqueue(q, run, tasks(3))
    enqueue(q, run, tasks(3))  # the same job's transaction, run again after a lost reply
    t = run(q.totals())
    assert (t.waiting, t.waiting_cost, t.owners) == (3, 24, 1)


def test_a_lapsed_start_estimate_is_renewed(store, run):
    q = store.queue
    enqueue(q, run, tasks(10, owner="a", job="a1", count=4, steps=10))
    enqueue(q, run, tasks(1, owner="a", job="a2", count=4, steps=10))
    now = time.time()
    _, start = run(q.position(redis_keys.job("a2"), "a", now, throughput=400.0))  # 400 row-steps ahead: 1 s
    assert abs(start - (now + 1.0)) < 1e-3
    _, later = run(q.position(redis_keys.job("a2"), "a", now + 5, throughput=400.0))  # it did not start
    assert abs(later - (now + 6.0)) < 1e-3


def test_every_jobs_first_shard_goes_past_a_full_window_up_to_the_ceiling(store, run):
    """The same owner's later jobs are not held behind its big one once that one is admitted:
    each job's first shard goes past a full window, up to the ceiling (twice the window and the
    owner's share); a job's other shards, and everything behind them, wait their turn."""
    q = store.queue
    enqueue(q, run, tasks(4, owner="a", job="big"))
    assert len(read(q, run, window=16)) == 4  # 16 rows: the window is full
    enqueue(q, run, tasks(1, owner="a", job="small", count=1))
    for k in range(3):
        enqueue(q, run, tasks(1, owner="a", job=f"more{k}", count=4))
    got = read(q, run, window=16)
    assert [m.task.job_id for m in got] == ["small", "more0"]  # 21 rows; 25 > 24, halfway to the ceiling
    enqueue(q, run, tasks(2, owner="b", job="b"))  # another owner holding nothing goes in, one shard
    assert [(m.task.job_id, m.task.shard) for m in read(q, run, window=16)] == [("b", 0)]


def test_a_newcomer_goes_in_even_when_the_window_shrank_under_what_is_in_flight(store, run):
    """The window follows the Denoisers' reports and can shrink (a replica lost, a smaller batch)
    below the rows already in flight: an owner holding nothing still gets one shard in."""
    q = store.queue
    enqueue(q, run, tasks(10, owner="big", job="big"))
    assert len(read(q, run, window=40)) == 10  # 40 rows in flight
    enqueue(q, run, tasks(2, owner="small", job="s", count=1))
    got = read(q, run, window=8)  # now the window is 8 rows, the ceiling 16
    assert [(m.task.owner, m.task.shard) for m in got] == [("small", 0)]
