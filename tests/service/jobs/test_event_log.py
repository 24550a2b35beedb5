"""The job event stream, written by the store's transitions against the real Redis-compatible
server: every transition's event, in order, throttled progress that never goes back, exactly
one terminal event and nothing after it."""

from __future__ import annotations

import json
import time

from service.jobs import redis_keys
from service.jobs.events import PROGRESS_GAP_S, EventKind
from service.jobs.records import JobParams, JobStatus, ShardTask

P = JobParams(model="mnist", num_images=6, steps=10, sampler="ddim", eta=0.0, seed=1, class_label=1, guidance_scale=1.0)


def shards(job_id: str) -> list[ShardTask]:
    return [ShardTask(job_id=job_id, shard=k, start=4 * k, count=c, params=P) for k, c in ((0, 4), (1, 2))]


def kinds(store, run, job_id: str, after: str = "0") -> list[str]:
    return [e.kind.value for e in run(store.read_events(job_id, after))]


def progress(store, run, job_id: str) -> list[dict]:
    return [json.loads(e.data) for e in run(store.read_events(job_id, "0")) if e.kind == EventKind.progress]


def test_a_job_that_succeeds_tells_each_step_once_and_ends_with_one_terminal_event(store, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    [queued] = run(store.read_events(job_id, "0"))
    assert queued.kind == EventKind.queued and queued.data == ""  # the reader renders the job view
    assert run(store.mark_running(job_id, "alice")) == 1
    run(store.mark_running(job_id, "alice"))  # a second shard starting: no second event
    run(store.record_steps([(job_id, 0, 2), (job_id, 1, 4)]))  # one event for the job, with both shards
    run(store.record_steps([(job_id, 0, 6)]))  # within the gap: not told
    time.sleep(PROGRESS_GAP_S + 0.05)
    run(store.record_steps([(job_id, 0, 6)]))  # now told
    time.sleep(PROGRESS_GAP_S + 0.05)
    run(store.record_steps([(job_id, 0, 6), (job_id, 1, 0)]))  # shard 1 retried from 0: the step does not go back
    time.sleep(PROGRESS_GAP_S + 0.05)
    run(store.record_steps([(job_id, 0, 6)]))  # nothing moved: not told again
    a, b = shards(job_id)
    assert run(store.complete_shard(a, [("ab" * 32, 100)] * 4)) == ("running", False)
    assert run(store.complete_shard(b, [("cd" * 32, 90)] * 2)) == ("running", True)
    record = run(store.get(job_id))
    assert run(store.files(record)) == {  # what the manifest is written from
        **{i: ("ab" * 32, 100) for i in range(4)},
        4: ("cd" * 32, 90),
        5: ("cd" * 32, 90),
    }
    assert run(store.succeed(job_id, "alice"))
    assert run(store.files(record)) == {}  # the manifest in the bucket holds them now
    run(store.record_steps([(job_id, 1, 3)]))  # a late report after the end
    assert not run(store.add_preview(job_id, 12, "{}"))
    assert run(store.finish(job_id, "alice", JobStatus.canceled)) is False

    assert kinds(store, run, job_id) == ["queued", "started", *["progress"] * 4, "succeeded"]
    told = progress(store, run, job_id)
    # shard 1's completion came within the gap of shard 0's: the final progress carries it
    assert [(p["step"], p["images_done"]) for p in told] == [(3, 0), (5, 0), (5, 4), (10, 6)]
    assert {(p["steps"], p["images_total"]) for p in told} == {(10, 6)}
    ids = [e.id for e in run(store.read_events(job_id, "0"))]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    assert kinds(store, run, job_id, after=ids[2]) == ["progress", "progress", "progress", "succeeded"]
    assert run(store.read_events(job_id, ids[-1])) == []


def test_previews_never_go_back_when_the_first_shard_is_retried(store, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    run(store.mark_running(job_id, "alice"))
    assert [run(store.add_preview(job_id, step, f'{{"step": {step}}}')) for step in (2, 4, 6)] == [True] * 3
    # the shard's retry starts over: its previews are dropped until they pass step 6
    assert [run(store.add_preview(job_id, step, f'{{"step": {step}}}')) for step in (2, 4, 6, 8)] == [
        False, False, False, True,
    ]  # fmt: skip
    shown = [json.loads(e.data)["step"] for e in run(store.read_events(job_id, "0")) if e.kind == EventKind.preview]
    assert shown == [2, 4, 6, 8]


def test_canceled_and_failed_jobs_end_with_their_event_and_previews_stop(store, run):
    canceled, _, _ = run(store.submit("alice", P, {}))
    assert not run(store.add_preview(canceled, 1, '{"step": 1}'))  # not running yet
    run(store.mark_running(canceled, "alice"))
    assert run(store.add_preview(canceled, 1, '{"step": 1}'))
    assert run(store.finish(canceled, "alice", JobStatus.canceled))
    assert not run(store.add_preview(canceled, 2, '{"step": 2}'))
    assert kinds(store, run, canceled) == ["queued", "started", "canceled"]  # its preview went with it
    failed, _, _ = run(store.submit("alice", P, {}))
    assert run(store.finish(failed, "alice", JobStatus.failed))
    run(store.record_steps([(failed, 0, 3)]))
    assert kinds(store, run, failed) == ["queued", "failed"]


def test_the_stream_lives_as_long_as_the_record_and_goes_with_it(store, run):
    job_id, _, _ = run(store.submit("alice", P, {}))
    run(store.mark_running(job_id, "alice"))
    record_ttl = run(store.r.pttl(redis_keys.job(job_id)))
    assert abs(run(store.r.pttl(redis_keys.job_events(job_id))) - record_ttl) < 2000
    a, b = shards(job_id)
    run(store.complete_shard(a, [("ab" * 32, 100)] * 4))
    run(store.complete_shard(b, [("cd" * 32, 90)] * 2))
    run(store.succeed(job_id, "alice"))
    assert run(store.r.exists(redis_keys.job_events(job_id))) == 1
    assert run(store.delete(job_id, "alice")) == JobStatus.succeeded
    assert run(store.r.exists(redis_keys.job_events(job_id), redis_keys.job_files(job_id))) == 0


def test_reading_blocks_until_an_event_arrives(store, run):
    import asyncio

    job_id, _, _ = run(store.submit("alice", P, {}))
    [queued] = run(store.read_events(job_id, "0"))

    async def wait_and_cancel():
        reader = asyncio.ensure_future(store.read_events(job_id, queued.id, block_ms=900))
        await asyncio.sleep(0.2)
        assert not reader.done()
        await store.finish(job_id, "alice", JobStatus.canceled)
        return await reader

    [event] = run(wait_and_cancel())
    assert event.kind == EventKind.canceled


def test_a_running_job_keeps_its_newest_previews_and_an_ended_one_none(store, run):
    """Previews are the stream's largest entries (a 256x256 model's ~250 KB each): while the job
    runs its stream holds the newest PREVIEWS_KEPT (a follower sees each as it comes), and none
    once it has ended; its progress and terminal events stay for replay."""
    from service.jobs.events import PREVIEWS_KEPT

    job_id, _, _ = run(store.submit("alice", P, {}))
    run(store.mark_running(job_id, "alice"))
    for step in range(1, 8):
        assert run(store.add_preview(job_id, step, f'{{"step": {step}}}'))
    previews = [json.loads(e.data)["step"] for e in run(store.read_events(job_id, "0")) if e.kind == EventKind.preview]
    assert previews == list(range(8 - PREVIEWS_KEPT, 8))
    record_ttl = run(store.r.pttl(redis_keys.job(job_id)))  # read first: both count down meanwhile
    assert 0 < run(store.r.pttl(redis_keys.job_previews(job_id))) <= record_ttl
    a, b = shards(job_id)
    run(store.complete_shard(a, [("ab" * 32, 100)] * 4))
    run(store.complete_shard(b, [("cd" * 32, 90)] * 2))
    assert run(store.succeed(job_id, "alice"))
    assert "preview" not in kinds(store, run, job_id) and kinds(store, run, job_id)[-1] == "succeeded"
    assert run(store.r.exists(redis_keys.job_previews(job_id), redis_keys.job_files(job_id))) == 0


def test_every_key_a_job_leaves_expires(store, run):
    """After a job's whole life every key it touched has a TTL, the owner's status indexes
    included (a status set a transition adds to lives as long as its newest record)."""
    job_id, _, _ = run(store.submit("alice", P, {}, idempotency_key="k"))
    run(store.mark_running(job_id, "alice"))
    run(store.add_preview(job_id, 1, "{}"))
    a, b = shards(job_id)
    run(store.complete_shard(a, [("ab" * 32, 100)] * 4))
    run(store.complete_shard(b, [("cd" * 32, 90)] * 2))
    assert run(store.succeed(job_id, "alice"))
    other, _, _ = run(store.submit("alice", P, {}))
    run(store.finish(other, "alice", JobStatus.canceled))
    # the queue's per-owner keys hold shards still waiting (these were never admitted) and are
    # deleted when the owner's last shard settles: work must not expire
    touched = [
        k
        for k in run(store.r.keys("*"))
        if (job_id in k or ":owner:alice:" in k or ":idem:" in k) and not k.startswith(redis_keys.QUEUE_OWNER_PREFIX)
    ]
    assert (
        redis_keys.owner_status_jobs("alice", "succeeded") in touched
        and redis_keys.owner_status_jobs("alice", "canceled") in touched
    )
    lives = {k: run(store.r.pttl(k)) for k in touched}
    assert all(ttl > 0 for ttl in lives.values()), {k: v for k, v in lives.items() if v <= 0}
