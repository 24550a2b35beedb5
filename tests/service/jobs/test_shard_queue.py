"""ShardQueue against the real Redis-compatible server: the only code that touches the stream."""

from __future__ import annotations

import time

import redis

from service.jobs import keys
from service.jobs.queue import backlog
from service.jobs.schemas import JobParams, ShardTask

P = JobParams(model="mnist", num_images=8, steps=2, sampler="ddim", eta=0.0, seed=1, class_label=1, guidance_scale=1.0)


def tasks(n: int) -> list[ShardTask]:
    return [ShardTask(job_id="j", shard=k, start=4 * k, count=4, params=P) for k in range(n)]


def enqueue(queue, run, items: list[ShardTask]) -> None:
    async def go():
        await queue.ensure_group()
        async with queue.r.pipeline(transaction=True) as pipe:
            queue.enqueue(pipe, items)
            await pipe.execute()

    run(go())


def test_enqueue_then_read_delivers_each_task_once(store, run):
    q = store.queue
    enqueue(q, run, tasks(3))
    assert run(q.depth()) == 3
    got = run(q.read("c1", 10, 10))
    assert [m.task for m in got] == tasks(3)
    assert run(q.read("c2", 10, 10)) == []  # delivered to c1 only
    run(q.ensure_group())  # idempotent


def test_unparseable_messages_come_back_without_a_task(store, run):
    q = store.queue
    run(q.ensure_group())
    run(q.r.xadd(keys.SHARD_STREAM, {"task": "{not json"}))
    run(q.r.xadd(keys.SHARD_STREAM, {"other": "x"}))
    got = run(q.read("c", 10, 10))
    assert [m.task for m in got] == [None, None] and got[0].fields == {"task": "{not json"}


def test_ack_deletes_so_depth_is_the_backlog(store, run):
    q = store.queue
    enqueue(q, run, tasks(2))
    first, second = run(q.read("c", 10, 10))
    run(q.ack(first.id))
    assert run(q.depth()) == 1
    pending = run(q.r.xpending(keys.SHARD_STREAM, keys.CONSUMER_GROUP))
    assert pending["pending"] == 1


def test_requeue_adds_the_next_attempt_and_drops_the_old_message(store, run):
    q = store.queue
    enqueue(q, run, tasks(1))
    (msg,) = run(q.read("c", 10, 10))
    run(q.requeue(msg.id, msg.task.model_copy(update={"last_error": "oops"})))
    assert run(q.depth()) == 1
    (again,) = run(q.read("c", 10, 10))
    assert again.id != msg.id and again.task.attempt == 2 and again.task.last_error == "oops"


def test_dead_letter_moves_the_message_with_its_reason(store, run):
    q = store.queue
    enqueue(q, run, tasks(1))
    (msg,) = run(q.read("c", 10, 10))
    run(q.dead_letter(msg.id, msg.fields, "out of attempts"))
    assert run(q.depth()) == 0
    (dead,) = run(q.r.xrange(keys.DEAD_LETTER_STREAM))
    assert dead[1] == {**msg.fields, "reason": "out of attempts"}


def test_reclaim_takes_over_silent_messages_and_heartbeat_prevents_it(store, run):
    q = store.queue
    enqueue(q, run, tasks(2))
    beating, silent = run(q.read("dead-consumer", 10, 10))
    time.sleep(0.35)
    run(q.heartbeat("dead-consumer", beating.id))
    claimed = run(q.reclaim("rescuer", idle_ms=300))
    assert [m.id for m in claimed] == [silent.id] and claimed[0].task == silent.task
    assert run(q.reclaim("rescuer", idle_ms=300)) == []  # the claim reset its idle time


def test_reclaim_skips_entries_deleted_meanwhile(store, run):
    q = store.queue
    enqueue(q, run, tasks(1))
    (msg,) = run(q.read("c", 10, 10))
    run(q.r.xdel(keys.SHARD_STREAM, msg.id))  # settled elsewhere, still pending here
    time.sleep(0.05)
    assert run(q.reclaim("rescuer", idle_ms=10)) == []


def test_backlog_reads_the_depth_with_a_sync_client(store, run, redis_server):
    q = store.queue
    enqueue(q, run, tasks(3))
    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/7")
    assert backlog(client) == run(q.depth()) == 3


def test_reclaim_walks_a_long_pending_list_page_by_page(store, run):
    q = store.queue
    enqueue(q, run, tasks(5))
    run(q.read("dead-consumer", 10, 10))
    time.sleep(0.05)
    pages = [run(q.reclaim("rescuer", idle_ms=10, count=2)) for _ in range(3)]
    assert [len(p) for p in pages] == [2, 2, 1]
    assert sorted(m.task.shard for p in pages for m in p) == [0, 1, 2, 3, 4]  # each once, in order


def test_idle_consumers_without_pending_messages_are_pruned(store, run):
    q = store.queue
    enqueue(q, run, tasks(1))
    run(q.read("busy", 1, 10))  # holds a pending message
    run(q.read("gone", 1, 10))  # nothing left for it: joins the group with nothing pending
    time.sleep(0.05)
    assert run(q.prune_consumers(10, keep="me")) == ["gone"]
    names = {c["name"] for c in run(q.r.xinfo_consumers(keys.SHARD_STREAM, keys.CONSUMER_GROUP))}
    assert names == {"busy"}
