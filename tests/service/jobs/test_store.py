"""JobStore against the real Redis-compatible server: submission, and each Lua transition."""

from __future__ import annotations

import pytest

from service.api.deps import Context
from service.api.views import job_view
from service.jobs.records import JobError, JobParams, JobStatus, ShardTask
from service.jobs.store import IdempotencyConflict, JobStore
from service.settings import Settings
from service.storage import ObjectStore


def params(num_images: int = 10, steps: int = 5) -> JobParams:
    return JobParams(
        model="mnist", num_images=num_images, steps=steps, sampler="ddim", eta=0.0, seed=3, class_label=1,
        guidance_scale=1.0,
    )  # fmt: skip


def task(job_id: str, shard: int, start: int, count: int, p: JobParams) -> ShardTask:
    return ShardTask(job_id=job_id, shard=shard, start=start, count=count, params=p)


def test_submit_writes_the_record_and_queues_every_shard_atomically(store, run):
    job_id, created, created_at = run(store.submit("alice", params(10), {"n": 10}))
    record = run(store.get(job_id))
    assert created and record.owner == "alice" and record.status == JobStatus.queued
    assert record.created_at == created_at and record.started_at is None
    assert (record.num_shards, record.shard_size, record.images_done) == (3, 4, 0)
    assert [record.shard_range(k) for k in range(3)] == [(0, 4), (4, 4), (8, 2)]
    messages = run(store.queue.read("c", deadline_ms=2**62, window=100))
    assert [(m.task.shard, m.task.start, m.task.count) for m in messages] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]


def test_idempotency_key_returns_the_first_job_or_conflicts(store, run):
    first, created, _ = run(store.submit("alice", params(), {"a": 1}, idempotency_key="k"))
    again, created_again, _ = run(store.submit("alice", params(), {"a": 1}, idempotency_key="k"))
    assert created and not created_again and again == first
    with pytest.raises(IdempotencyConflict):
        run(store.submit("alice", params(), {"a": 2}, idempotency_key="k"))
    other, created_other, _ = run(store.submit("bob", params(), {"a": 1}, idempotency_key="k"))
    assert created_other and other != first  # keys are per owner
    assert run(store.queue.depth()) == 2 * 3  # the repeat queued nothing


def test_start_moves_queued_to_running_once_and_never_revives_a_finished_job(store, run):
    job_id, _, _ = run(store.submit("alice", params(), {}))
    assert run(store.mark_running(job_id, "alice")) == 1
    assert run(store.get(job_id)).started_at is not None
    assert run(store.mark_running(job_id, "alice")) == 0
    assert run(store.finish(job_id, "alice", JobStatus.canceled))
    assert run(store.mark_running(job_id, "alice")) == -1
    assert run(store.get(job_id)).status == JobStatus.canceled
    assert run(store.mark_running("no-such-job", "alice")) == -1


def test_complete_shard_counts_each_shard_once_and_the_job_succeeds_once(store, run):
    p = params(10)
    job_id, _, _ = run(store.submit("alice", p, {}))
    shards = [task(job_id, 0, 0, 4, p), task(job_id, 1, 4, 4, p), task(job_id, 2, 8, 2, p)]
    assert not run(store.succeed(job_id, "alice"))  # shards still to do
    assert run(store.complete_shard(shards[0])) == ("queued", False)
    assert run(store.complete_shard(shards[0])) == ("queued", False)  # a retried shard: no double count
    assert run(store.get(job_id)).images_done == 4
    assert run(store.complete_shard(shards[1])) == ("queued", False)
    assert run(store.complete_shard(shards[2])) == ("queued", True)  # all done: the manifest, then succeed
    assert run(store.get(job_id)).status == JobStatus.queued
    assert run(store.complete_shard(shards[2])) == ("queued", True)  # a retry before succeed says so again
    assert run(store.succeed(job_id, "alice"))
    assert not run(store.succeed(job_id, "alice"))  # succeeded exactly once
    assert run(store.complete_shard(shards[2])) == ("succeeded", False)
    record = run(store.get(job_id))
    assert record.status == JobStatus.succeeded and record.finished_at is not None
    assert record.images_done == 10 and record.done_shards == {0, 1, 2}
    assert record.shard_steps == {0: 5, 1: 5, 2: 5}


def test_complete_shard_of_a_canceled_or_missing_job_changes_nothing(store, run):
    p = params(4)
    job_id, _, _ = run(store.submit("alice", p, {}))
    run(store.finish(job_id, "alice", JobStatus.canceled))
    assert run(store.complete_shard(task(job_id, 0, 0, 4, p))) == ("canceled", False)
    assert run(store.get(job_id)).status == JobStatus.canceled
    assert run(store.complete_shard(task("gone", 0, 0, 4, p))) == ("missing", False)
    assert run(store.get("gone")) is None


def test_finish_moves_only_active_jobs_and_stores_the_error(store, run):
    job_id, _, _ = run(store.submit("alice", params(), {}))
    error = JobError(code="shard_failed", message="boom")
    assert run(store.finish(job_id, "alice", JobStatus.failed, error))
    assert not run(store.finish(job_id, "alice", JobStatus.canceled))  # already terminal
    record = run(store.get(job_id))
    assert record.status == JobStatus.failed and record.error == error and record.finished_at is not None


def test_record_steps_writes_progress_and_reports_statuses(store, run):
    a, _, _ = run(store.submit("alice", params(8), {}))
    b, _, _ = run(store.submit("alice", params(8), {}))
    run(store.finish(b, "alice", JobStatus.canceled))
    statuses = run(store.record_steps([(a, 0, 3), (a, 1, 5), (b, 0, 2), ("gone", 0, 1)]))
    assert statuses == [JobStatus.queued, JobStatus.queued, JobStatus.canceled, None]
    assert run(store.get(a)).shard_steps == {0: 3, 1: 5}
    assert run(store.get("gone")) is None  # no record is created for a missing job
    assert run(store.record_steps([])) == []


def test_result_indices_come_from_the_shard_size_the_job_was_cut_with(store, run, redis_server):
    """40 images submitted with shard size 16 and read back while the setting says 32 keep the
    shards they were cut in: every index maps to its image, none past the end."""
    p = params(40)
    store.shard_size = 16
    job_id, _, _ = run(store.submit("alice", p, {}))
    for k, (start, count) in enumerate([(0, 16), (16, 16), (32, 8)]):
        assert run(store.complete_shard(task(job_id, k, start, count, p)))[0] == "queued"
    assert run(store.succeed(job_id, "alice"))
    later = JobStore(store.r, 600, shard_size=32)  # the setting changed after submission
    record = run(later.get(job_id))
    assert record.shard_size == 16 and record.status == JobStatus.succeeded
    # presigning needs keys (since S3 keys became optional), not a server
    settings = Settings(shard_size=32, s3_access_key_id="k", s3_secret_access_key="offline")
    ctx = Context(
        settings=settings,
        store=later,
        lifecycle=None,
        objects=ObjectStore(settings.storage),
        registry=None,
        denoiser=None,
    )  # type: ignore[arg-type]
    view = job_view(record, ctx)
    assert [r.index for r in view.results] == list(range(40))
    assert all(r.key.endswith(f"/{r.index:05d}.png") for r in view.results)


def test_a_record_knows_its_shards_and_refuses_one_past_the_last(store, run):
    job_id, _, _ = run(store.submit("alice", params(10), {}))
    record = run(store.get(job_id))
    assert (record.shard_size, record.num_shards) == (store.shard_size, 3) == (4, 3)
    assert record.shard_range(2) == (8, 2)
    with pytest.raises(ValueError, match="has no shard 3"):
        record.shard_range(3)


def test_record_steps_never_moves_a_finished_shard_back(store, run):
    p = params(8)
    job_id, _, _ = run(store.submit("alice", p, {}))
    run(store.complete_shard(task(job_id, 0, 0, 4, p)))  # shard 0 done at step 5
    run(store.record_steps([(job_id, 0, 2), (job_id, 1, 3)]))  # a late duplicate of shard 0
    assert run(store.get(job_id)).shard_steps == {0: 5, 1: 3}


def _ids(records) -> list[str]:
    return [r.id for r in records]


def test_the_status_index_follows_every_transition(store, run):
    """Listing by status reads the index the transition scripts keep, not every job."""
    a, _, _ = run(store.submit("alice", params(4), {}))
    b, _, _ = run(store.submit("alice", params(4), {}))
    c, _, _ = run(store.submit("alice", params(4), {}))
    run(store.submit("bob", params(4), {}))
    run(store.mark_running(a, "alice"))
    run(store.complete_shard(task(a, 0, 0, 4, params(4))))
    run(store.succeed(a, "alice"))
    run(store.finish(b, "alice", JobStatus.canceled))

    def listed(status):
        return _ids(run(store.list_owned("alice", status, 10, None))[0])

    assert listed(JobStatus.succeeded) == [a]
    assert listed(JobStatus.canceled) == [b]
    assert listed(JobStatus.queued) == [c]
    assert listed(JobStatus.running) == [] and listed(JobStatus.failed) == []
    assert listed(None) == [c, b, a]
    index = run(store.r.zrange("undiffuse:owner:alice:jobs:queued", 0, -1))
    assert index == [c]  # a and b left the queued index as they moved


def test_the_cursor_neither_skips_nor_repeats_jobs_created_in_the_same_microsecond(store, run):
    ids = [run(store.submit("alice", params(1), {}))[0] for _ in range(7)]
    # one timestamp for all (a recent one: older entries are pruned as expired)
    now_us = int(run(store.get(ids[0])).created_at * 1e6)
    run(store.r.zadd("undiffuse:owner:alice:jobs", {job_id: now_us for job_id in ids}))
    seen, cursor = [], None
    while True:
        page, cursor = run(store.list_owned("alice", None, 2, cursor))
        seen += _ids(page)
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen)) == 7


def test_jobs_in_flight_are_limited_per_owner_in_the_submit_transaction(store, run):
    from service.jobs.store import TooManyJobsInFlight

    first, _, _ = run(store.submit("alice", params(1), {}, max_in_flight=2))
    run(store.submit("alice", params(1), {}, max_in_flight=2))
    with pytest.raises(TooManyJobsInFlight):
        run(store.submit("alice", params(1), {}, max_in_flight=2))
    run(store.submit("bob", params(1), {}, max_in_flight=2))  # another owner's limit is its own
    run(store.finish(first, "alice", JobStatus.canceled))
    run(store.submit("alice", params(1), {}, max_in_flight=2))  # an ended job frees its place
    # an idempotent replay is an answer about an existing job, never refused
    again, created, _ = run(store.submit("alice", params(1), {"x": 1}, idempotency_key="k", max_in_flight=3))
    assert created
    assert run(store.submit("alice", params(1), {"x": 1}, idempotency_key="k", max_in_flight=3))[0] == again


def test_delete_removes_a_finished_job_and_leaves_an_active_one(store, run):
    done, _, _ = run(store.submit("alice", params(4), {}))
    active, _, _ = run(store.submit("alice", params(4), {}))
    run(store.complete_shard(task(done, 0, 0, 4, params(4))))
    run(store.succeed(done, "alice"))
    assert run(store.delete(active, "alice")) == JobStatus.queued
    assert run(store.get(active)) is not None
    assert run(store.delete(done, "alice")) == JobStatus.succeeded
    assert run(store.get(done)) is None
    assert _ids(run(store.list_owned("alice", None, 10, None))[0]) == [active]
    assert run(store.list_owned("alice", JobStatus.succeeded, 10, None))[0] == []
    assert run(store.delete(done, "alice")) is None


def test_every_job_is_scheduled_for_purging_when_its_record_expires(store, run):
    job_id, _, created_at = run(store.submit("alice", params(1), {}))
    assert run(store.r.zscore("undiffuse:purge", job_id)) == pytest.approx(created_at + store.ttl)
    assert run(store.purges.due(created_at + store.ttl - 1, 10)) == []
    [(due_id, due_at)] = run(store.purges.due(created_at + store.ttl + 1, 10))
    assert due_id == job_id and due_at == pytest.approx(created_at + store.ttl)
    run(store.purges.schedule(job_id, created_at))
    [(due_id, due_at)] = run(store.purges.due(created_at + 1, 10))
    run(store.purges.swept([(due_id, due_at)]))
    assert run(store.purges.due(created_at + store.ttl + 1, 10)) == []


def test_a_purge_rescheduled_while_it_was_swept_stays_scheduled(store, run):
    job_id, _, created_at = run(store.submit("alice", params(1), {}))
    run(store.purges.schedule(job_id, created_at))
    due = run(store.purges.due(created_at + 1, 10))
    run(store.purges.schedule(job_id, created_at + 60))  # e.g. a DELETE between the read and the removal
    run(store.purges.swept(due))
    assert [j for j, _ in run(store.purges.due(created_at + 61, 10))] == [job_id]


def test_cost_in_flight_is_checked_in_the_submit_transaction(store, run):
    """Concurrent submissions cannot overshoot the image-steps quota: with room for 3 jobs of 50
    image-steps, 8 submitted at once queue exactly 3; a finished job makes room again."""
    import asyncio

    from service.jobs.store import CostInFlightExceeded

    async def attempt() -> str | None:
        try:
            job_id, _, _ = await store.submit("alice", params(10, 5), {}, max_cost_in_flight=150)
            return job_id
        except CostInFlightExceeded as e:
            assert e.in_flight >= 100 and e.limit == 150
            return None

    async def all_at_once():
        return await asyncio.gather(*(attempt() for _ in range(8)))

    queued = [j for j in run(all_at_once()) if j]
    assert len(queued) == 3
    assert run(store.submit("bob", params(10, 5), {}, max_cost_in_flight=150))[1]  # per owner
    run(store.finish(queued[0], "alice", JobStatus.canceled))
    assert run(store.submit("alice", params(10, 5), {}, max_cost_in_flight=150))[1]


def test_stored_bytes_are_counted_once_per_shard_and_given_back_once(store, run):
    """An owner's bytes in the bucket: a shard's PNG sizes count at its first completion while the
    job is active, and deleting the job's objects gives them back exactly once."""
    from service.jobs import redis_keys

    job_id, _, _ = run(store.submit("alice", params(8), {}))
    a, b = [ShardTask(job_id=job_id, shard=k, start=4 * k, count=4, owner="alice", params=params(8)) for k in range(2)]
    run(store.complete_shard(a, [("ab" * 32, 100)] * 4))
    run(store.complete_shard(a, [("ab" * 32, 100)] * 4))  # a duplicate attempt
    assert run(store.stored_bytes("alice")) == 400
    run(store.finish(job_id, "alice", JobStatus.canceled))
    run(store.complete_shard(b, [("cd" * 32, 50)] * 4))  # a straggler after the end: purged, not counted
    assert run(store.stored_bytes("alice")) == 400 and run(store.stored_bytes("bob")) == 0
    assert 0 < run(store.r.ttl(redis_keys.owner_stored_bytes("alice"))) and 0 < run(
        store.r.ttl(redis_keys.job_usage(job_id))
    )
    run(store.release_storage(job_id))
    run(store.release_storage(job_id))  # the sweeper after a DELETE
    assert run(store.stored_bytes("alice")) == 0


def test_an_owner_keeps_at_most_max_stored_jobs(store, run):
    from service.jobs.store import TooManyJobsStored

    for _ in range(3):
        run(store.submit("alice", params(), {}, max_stored=3))
    with pytest.raises(TooManyJobsStored):
        run(store.submit("alice", params(), {}, max_stored=3))
    assert run(store.submit("bob", params(), {}, max_stored=3))[1]
