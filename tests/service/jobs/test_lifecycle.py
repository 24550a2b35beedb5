"""JobLifecycle: every start and end of a job, with its side effects exactly once."""

from __future__ import annotations

import pytest

from service.jobs.lifecycle import JobEnded, JobLifecycle, JobStarted
from service.jobs.records import JobError, JobParams, JobStatus, ShardTask
from service.jobs.store import JobFinished, JobNotFound

P = JobParams(model="mnist", num_images=6, steps=2, sampler="ddim", eta=0.0, seed=1, class_label=1, guidance_scale=1.0)


@pytest.fixture
def events():
    return []


@pytest.fixture
def lifecycle(store, events):
    return JobLifecycle(store, listeners=[events.append])


def test_start_then_success_each_emit_once(store, lifecycle, events, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    record = run(store.get(job_id))
    assert run(lifecycle.start(record)) and run(lifecycle.start(record))
    shards = [ShardTask(job_id=job_id, shard=k, start=4 * k, count=c, params=P) for k, c in ((0, 4), (1, 2))]
    assert not run(lifecycle.complete_shard(shards[0], record))
    assert run(lifecycle.complete_shard(shards[1], record))  # all done: the manifest, then succeed
    assert [type(e) for e in events] == [JobStarted]
    assert run(lifecycle.succeed(record))
    assert not run(lifecycle.succeed(record))  # a retry after success
    assert not run(lifecycle.complete_shard(shards[1], record))
    assert [type(e) for e in events] == [JobStarted, JobEnded]
    assert events[1].status == JobStatus.succeeded and events[1].duration_s >= 0


def test_fail_emits_once_and_a_finished_job_does_not_start(store, lifecycle, events, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    record = run(store.get(job_id))
    error = JobError(code="shard_failed", message="x")
    assert run(lifecycle.fail(record, error))
    assert not run(lifecycle.fail(record, error))
    assert not run(lifecycle.start(record))
    assert [(type(e), e.status) for e in events] == [(JobEnded, JobStatus.failed)]


def test_cancel_is_owner_scoped_and_happens_once(store, lifecycle, events, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    with pytest.raises(JobNotFound):
        run(lifecycle.cancel(job_id, "bob"))
    record = run(lifecycle.cancel(job_id, "alice"))
    assert record.status == JobStatus.canceled
    with pytest.raises(JobFinished) as err:
        run(lifecycle.cancel(job_id, "alice"))
    assert err.value.status == JobStatus.canceled
    assert [(type(e), e.status) for e in events] == [(JobEnded, JobStatus.canceled)]


def test_a_failing_listener_does_not_undo_the_transition(store, run):
    def broken(event):
        raise RuntimeError("webhook down")

    seen = []
    lifecycle = JobLifecycle(store, listeners=[broken, seen.append])
    job_id, _, _ = run(store.submit("alice", P, {}))
    record = run(lifecycle.cancel(job_id, "alice"))
    assert record.status == JobStatus.canceled and [e.status for e in seen] == [JobStatus.canceled]


def test_failed_and_canceled_jobs_have_their_images_purged_soon(store, run):
    import time

    lifecycle = JobLifecycle(store, listeners=[], purge_delay_seconds=30)
    failed, _, _ = run(store.submit("alice", P, {}))
    canceled, _, _ = run(store.submit("alice", P, {}))
    kept, _, _ = run(store.submit("alice", P, {}))
    run(lifecycle.fail(run(store.get(failed)), JobError(code="shard_failed", message="x")))
    run(lifecycle.cancel(canceled, "alice"))
    soon = time.time() + 31
    due = [job_id for job_id, _ in run(store.purges.due(soon, 10))]
    assert sorted(due) == sorted([failed, canceled]) and kept not in due
