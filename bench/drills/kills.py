"""Phase 1: load with replica kills. Worker and Denoiser replicas are killed (kill -9) at random
moments under load; each kill is timed until Serve runs a replacement and the service makes
progress again, and a killed Worker's leased shards until another consumer reclaimed them."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

from bench.drills.load import WAIT_S, Load, Monitor, Recorder, Size, log, make_jobs, wait_until, work
from service.dev.stack import LocalStack


def replicas(kind: str) -> list[dict]:
    """The live Ray actors of a deployment's replicas (class ServeReplica:undiffuse:<kind>), with
    their PIDs. Read from the GCS: ray.util.state.list_actors needs the dashboard, which the drill
    does not start."""
    from ray._private import state

    return [
        a
        for a in state.actors().values()
        if a["State"] == "ALIVE" and a["ActorClassName"] == f"ServeReplica:undiffuse:{kind}"
    ]


def serve_running(kind: str) -> bool:
    """Serve counts exactly one replica of the deployment, and it is RUNNING (constructed, healthy)."""
    from ray import serve

    states = serve.status().applications["undiffuse"].deployments[kind].replica_states
    return dict(states) == {"RUNNING": 1}


def pending_of(redis_client, consumer: str) -> int | None:
    """How many shards the consumer holds (leased, not settled); None if unknown."""
    from redis.exceptions import RedisError

    from service.jobs.queue import holders

    try:
        return sum(1 for holder, _task in holders(redis_client) if holder == consumer)
    except RedisError:
        return None


class OrphanWatch(threading.Thread):
    """After a Worker replica's kill: when did its consumer stop holding shards (the new replica
    reclaimed them once their leases had run out, a visibility timeout after the last heartbeat)?"""

    def __init__(self, rec: Recorder, redis_client, victim: dict) -> None:
        super().__init__(daemon=True)
        # the consumer is "worker-<replica id>", and the actor's name ends with "#<replica id>"
        self.rec, self.redis, self.consumer = rec, redis_client, "worker-" + victim["Name"].rsplit("#", 1)[-1]
        self.orphans = pending_of(redis_client, self.consumer)
        self.at = rec.now()
        self.cleared: float | None = None

    def run(self) -> None:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline and self.cleared is None:
            if pending_of(self.redis, self.consumer) == 0:
                self.cleared = self.rec.now() - self.at
            time.sleep(0.2)


def kill_replica(
    kind: str, rec: Recorder, load: Load, redis_client, window: int = 0
) -> tuple[dict, OrphanWatch | None]:
    """kill -9 the replica's process; then wait for a replacement that Serve runs and for the first
    images completed after it (in any job). Times in seconds from the kill. For a Worker, also a
    watch (still running) of the shards its consumer held. `window` more jobs are let through at
    the kill, so that there is work to complete once the replacement runs even when the jobs in
    flight happened to finish just before the kill (a recovery is otherwise unmeasurable)."""
    victims = wait_until(lambda: (v := replicas(kind)) and len(v) == 1 and serve_running(kind) and v, WAIT_S)
    if not victims:
        return {"kind": kind, "error": "no single running replica to kill"}, None
    victim = victims[0]
    in_flight = load.active_ids()
    watch = OrphanWatch(rec, redis_client, victim) if kind == "Worker" else None
    at = rec.now()
    os.kill(victim["Pid"], signal.SIGKILL)
    load.allow(load.completed + window)
    if watch is not None:
        watch.start()
    out = {"kind": kind, "pid": victim["Pid"], "at_s": round(at, 2), "in_flight": in_flight}
    if wait_until(lambda: any(a["ActorID"] != victim["ActorID"] for a in replicas(kind)), WAIT_S):
        out["replacement_alive_s"] = round(rec.now() - at, 2)
    if out.get("replacement_alive_s") is not None and wait_until(lambda: serve_running(kind), WAIT_S, 0.2):
        running = rec.now()
        out["replacement_running_s"] = round(running - at, 2)
        progress = wait_until(lambda: rec.progress_after(running), WAIT_S)
        out["recovery_s"] = round(progress - at, 2) if progress is not None else None
    log(f"kill -9 {kind} (pid {victim['Pid']}): " + ", ".join(f"{k} {v}" for k, v in out.items() if k.endswith("_s")))
    return out, watch


def load_with_kills(stack: LocalStack, rec: Recorder, monitor: Monitor, size: Size, rng: random.Random):
    """size.jobs jobs while replicas are killed at random moments, one kill at a time.

    Kill i comes when a random number of jobs (5-85 % of them, sorted, and at least two windows
    before the end) has ended. The clients are let at most a window (2 x clients jobs) past the
    next kill's mark, so that a kill never finds the load over (on 2 cores a short job takes well
    under a second, a recovery several), and one more window at the kill."""
    jobs = make_jobs("load+kills", size.jobs, size, rng)
    window = 2 * size.clients
    load = Load(rec, stack.base_url, jobs, size.clients, size.deadline_s)
    monitor.load = load
    kinds = ["Worker"] * size.kills + ["Denoiser"] * size.kills
    rng.shuffle(kinds)
    # kill when this many jobs ended; the clients run up to a window past a mark, so a mark leaves
    # two windows of jobs (one through the kill, one released at it for the replacement to take):
    # a last mark near the end would let the load run out before the replacement ran
    last = max(0, size.jobs - 2 * window)
    marks = sorted(min(int(rng.uniform(0.05, 0.85) * size.jobs), last) for _ in kinds)
    load.allowed = marks[0] + window if marks else len(jobs)
    kills, watches = [], []
    started = rec.now()
    load.start()
    for kind, mark in zip(kinds, marks, strict=True):
        load.allow(mark + window)
        wait_until(lambda m=mark: load.completed >= min(m, load.allowed) or load.done, size.deadline_s, 0.1)
        if load.done:
            kills.append({"kind": kind, "error": "the load ended before this kill"})
            continue
        load.allow(load.completed + window)  # work in flight through the kill and its recovery
        time.sleep(rng.uniform(0.0, 2.0))
        record, watch = kill_replica(kind, rec, load, monitor.redis, window)
        kills.append(record)
        watches.append((record, watch))
    load.allow(len(jobs))
    load.join()
    for record, watch in watches:
        if watch is not None:
            watch.join()
            record["orphaned_shards"] = watch.orphans
            if watch.orphans:  # (a kill that found the worker holding nothing has nothing to reclaim)
                record["orphans_reclaimed_s"] = round(watch.cleared, 2) if watch.cleared is not None else None
            log(f"kill -9 Worker at {record['at_s']} s: its {watch.orphans} shards reclaimed after {watch.cleared} s")
    ended = {j.id: j.ended_at for j in jobs if j.id}
    for k in kills:  # every job in flight at a kill: when had the last of them ended, after the kill?
        ends = [ended.get(i) for i in k.pop("in_flight", [])]
        if "replacement_running_s" in k and ends and None not in ends:
            k["in_flight_jobs_done_s"] = round(max(ends) - k["at_s"], 2)
    return jobs, {"wall_s": round(rec.now() - started, 1), **work(jobs, rec.now() - started), "kills": kills}
