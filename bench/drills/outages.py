"""Phases 2 and 3: a dependency away mid-load. Redis is killed (kill -9) and restarted from its
AOF on the same port; SeaweedFS is stopped and started again while fresh clients keep submitting."""

from __future__ import annotations

import random
import time
from collections import Counter

from bench.drills.load import Load, Monitor, Recorder, Size, log, make_jobs, wait_until, work
from service.dev.stack import LocalStack


def outage_under_load(stack: LocalStack, rec: Recorder, monitor: Monitor, size: Size, rng, phase: str, outage):
    """A load of size.outage_jobs jobs; once a quarter of them ended, outage() takes a dependency
    away and brings it back. Returns every job submitted in the phase, and the outage's times."""
    jobs = make_jobs(phase, size.outage_jobs, size, rng)
    load = Load(rec, stack.base_url, jobs, size.clients, size.deadline_s)
    monitor.load = load
    started = rec.now()
    load.start()
    wait_until(lambda: load.completed >= size.outage_jobs // 4 or load.done, size.deadline_s)
    window = outage()
    load.join()
    side = window.pop("side_load", None)
    if side is not None:
        side.join()
        jobs += side.jobs
    ends = [j.ended_at for j in jobs if j.ended_at is not None]
    if ends:  # how long the backlog the outage left took to clear
        window["last_job_ended_after_restart_s"] = round(max(ends) - window["up_at_s"], 1)
    return jobs, {"wall_s": round(rec.now() - started, 1), **work(jobs, rec.now() - started), **window}


def redis_away(stack: LocalStack, rec: Recorder, gap_s: float) -> dict:
    """kill -9 Redis, then restart it from its AOF on the same port and directory."""
    at = rec.now()
    stack.redis.proc.kill()
    stack.redis.proc.wait()
    log(f"Redis killed (kill -9); restarting in {gap_s:g} s")
    time.sleep(gap_s)
    restart = rec.now()
    stack.redis.start()
    up = rec.now()
    log(f"Redis restarted from its AOF in {up - restart:.1f} s")
    return {"killed_at_s": round(at, 2), "restarted_at_s": round(restart, 2), "up_at_s": round(up, 2)}


def s3_away(stack: LocalStack, rec: Recorder, size: Size, rng: random.Random) -> dict:
    """Stop SeaweedFS for size.s3_outage_s and start it again (same port, same data). While it is
    down, one more job per client is submitted from fresh clients: the API must accept them."""
    at = rec.now()
    stack.s3.stop()
    log(f"S3 (SeaweedFS) stopped for {size.s3_outage_s:g} s")
    side = Load(rec, stack.base_url, make_jobs("s3", size.clients, size, rng), size.clients, size.deadline_s).start()
    time.sleep(size.s3_outage_s)
    restart = rec.now()
    stack.s3.start()
    up = rec.now()
    log(f"S3 back in {up - restart:.1f} s")
    return {
        "stopped_at_s": round(at, 2),
        "restarted_at_s": round(restart, 2),
        "up_at_s": round(up, 2),
        "side_load": side,
    }


def redis_gap_report(rec: Recorder, window: dict) -> dict:
    """The gap: from the kill until the API answers a request sent after the restart with a 2xx.
    The answers to requests in it (answered after the kill, sent before the API was back), by
    status, and whether they came before Redis was up again."""
    calls = [c for c in rec.calls if c.phase == "redis"]
    back = min(
        (c.answered for c in calls if c.sent >= window["up_at_s"] and c.status is not None and c.status < 300),
        default=float("inf"),
    )
    in_gap = [c for c in calls if c.answered >= window["killed_at_s"] and c.sent < back]
    window["api_back_s"] = round(back - window["killed_at_s"], 2) if back != float("inf") else None
    window["gap_end_s"] = back
    window["gap_responses"] = dict(
        Counter(f"{c.status} {'before' if c.answered < window['up_at_s'] else 'after'} restart" for c in in_gap)
    )
    window["gap_503_without_retry_after"] = sum(1 for c in in_gap if c.status == 503 and not c.retry_after)
    return window


def s3_outage_report(rec: Recorder, window: dict) -> dict:
    calls = [c for c in rec.calls if c.phase == "s3" and window["stopped_at_s"] <= c.sent < window["up_at_s"]]
    window["outage_post_responses"] = dict(Counter(str(c.status) for c in calls if c.method == "POST"))
    return window
