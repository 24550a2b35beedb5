"""Fault drills against a local stack that this script starts (Redis-compatible server with AOF,
SeaweedFS, a new local Ray with Serve): load with replica kills, a Redis kill -9 and restart from
its AOF, an S3 outage, and hostile requests; then every job's images are counted and decoded.
Prints one table of outcomes and exits 1 if any target is missed. See docs/reliability.md.

    python bench/drills.py                 # 1,000 jobs, 5 + 5 replica kills, a 60 s S3 outage
    python bench/drills.py --short         # the CI size: 100 jobs, 2 + 2 kills, a 20 s outage
    python bench/drills.py --short --json results.json
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

if not __package__:  # run as `python bench/drills.py`: bench/service.py must not shadow the package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx  # noqa: E402

from bench import drill_hostile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"A": "drill-key-alice", "B": "drill-key-bob"}
S3_KEY, S3_SECRET = "drillaccess", "drill-secret-0123456789"
BUCKET = "undiffuse-drills"
TERMINAL = {"succeeded", "failed", "canceled"}
POLL_S = 1.0  # each client polls its job about once a second
WAIT_S = 300.0  # longest wait for a replacement replica, or for progress after it
RESULTS_PAGE = 7  # results per GET in the verification: several pages for most jobs


@dataclass(frozen=True)
class Size:
    jobs: int  # phase 1
    images: tuple[int, int]
    steps: tuple[int, int]
    clients: int
    kills: int  # of each deployment
    outage_jobs: int  # the load of phases 2 and 3, each
    redis_gap_s: float
    s3_outage_s: float
    shard_size: int
    deadline_s: float  # longest a phase may take before its unfinished jobs count as lost


FULL = Size(1000, (1, 16), (5, 20), 32, 5, 200, 5.0, 60.0, 4, 3600.0)  # phases 2 and 3: 200 jobs each
SHORT = Size(100, (1, 4), (5, 10), 8, 2, 30, 5.0, 20.0, 2, 600.0)


def log(message: str) -> None:
    print(f"[drills {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- what the clients saw ---------------------------------------------------------------------------
@dataclass
class Job:
    phase: str
    key: str  # "A" or "B"
    body: dict
    idem: str
    id: str | None = None
    status: str | None = None  # last seen by its client
    note: str = ""  # why it was not accepted or not seen to end
    ended_at: float | None = None


@dataclass
class Call:
    phase: str
    method: str
    sent: float
    answered: float
    status: int | None  # None: no HTTP answer (connection refused, reset, timed out)
    retry_after: str | None
    error: str | None = None


class Recorder:
    """Every HTTP exchange of the drill's clients, and every moment some job's images_done grew."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.progress: list[float] = []
        self.phase = "setup"

    def now(self) -> float:
        return time.monotonic() - self.t0

    def call(self, client: httpx.Client, method: str, path: str, **kw) -> httpx.Response | None:
        sent = self.now()
        try:
            r = client.request(method, path, **kw)
        except httpx.HTTPError as e:
            with self.lock:
                self.calls.append(Call(self.phase, method, sent, self.now(), None, None, type(e).__name__))
            return None
        with self.lock:
            self.calls.append(Call(self.phase, method, sent, self.now(), r.status_code, r.headers.get("retry-after")))
        return r

    def progressed(self) -> None:
        with self.lock:
            self.progress.append(self.now())

    def progress_after(self, t: float) -> float | None:
        with self.lock:
            return next((p for p in self.progress if p > t), None)


def retry_after(r: httpx.Response) -> float:
    try:
        return min(30.0, max(0.1, float(r.headers.get("retry-after", "1"))))
    except ValueError:
        return 1.0


class Load:
    """Jobs run by `clients` threads: each submits a job (429/503/no answer: re-POST with the same
    Idempotency-Key after Retry-After), polls it until it ends, and takes the next."""

    def __init__(self, rec: Recorder, base_url: str, jobs: list[Job], clients: int, deadline_s: float) -> None:
        self.rec, self.base_url, self.jobs = rec, base_url, jobs
        self.todo = list(reversed(jobs))
        self.lock = threading.Lock()
        self.active: dict[str, Job] = {}
        self.completed = 0
        self.taken = 0
        self.allowed = len(jobs)  # jobs handed out so far may not exceed this (see load_with_kills)
        self.deadline = rec.now() + deadline_s
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        for t in self.threads:
            t.join()

    @property
    def done(self) -> bool:
        return not any(t.is_alive() for t in self.threads)

    def active_ids(self) -> list[str]:
        with self.lock:
            return list(self.active)

    def _next(self) -> Job | None:
        while self.rec.now() < self.deadline:
            with self.lock:
                if not self.todo:
                    return None
                if self.taken < self.allowed:
                    self.taken += 1
                    return self.todo.pop()
            time.sleep(0.05)
        return None

    def allow(self, n: int) -> None:
        with self.lock:
            self.allowed = max(self.allowed, min(n, len(self.jobs)))

    def _client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=30) as client:
            while (job := self._next()) is not None:
                auth = {"Authorization": f"Bearer {KEYS[job.key]}"}
                if self._submit(client, job, auth):
                    self._poll(client, job, auth)
                with self.lock:
                    self.active.pop(job.id, None)
                    self.completed += 1

    def _submit(self, client: httpx.Client, job: Job, auth: dict) -> bool:
        headers = {**auth, "Idempotency-Key": job.idem}
        while self.rec.now() < self.deadline:
            r = self.rec.call(client, "POST", "/v1/jobs", json=job.body, headers=headers)
            if r is None:
                time.sleep(1.0)
            elif r.status_code in (200, 202):
                job.id, job.status = r.json()["id"], r.json()["status"]
                with self.lock:
                    self.active[job.id] = job
                return True
            elif r.status_code in (429, 503):
                time.sleep(retry_after(r))
            else:
                job.note = f"POST answered {r.status_code}: {r.text[:200]}"
                return False
        job.note = "not accepted before the deadline"
        return False

    def _poll(self, client: httpx.Client, job: Job, auth: dict) -> None:
        seen = 0
        while self.rec.now() < self.deadline:
            time.sleep(POLL_S * random.uniform(0.8, 1.2))
            r = self.rec.call(client, "GET", f"/v1/jobs/{job.id}", headers=auth)
            if r is None or r.status_code != 200:
                if r is not None and r.status_code in (429, 503):
                    time.sleep(retry_after(r))
                elif r is not None and r.status_code == 404:
                    job.status, job.note = "lost", "GET answered 404"
                    return
                continue
            view = r.json()
            job.status = view["status"]
            if view["progress"]["images_done"] > seen:
                seen = view["progress"]["images_done"]
                self.rec.progressed()
            if job.status in TERMINAL:
                job.ended_at = self.rec.now()
                if job.status != "succeeded":
                    job.note = json.dumps(view.get("error"))
                return
        job.note = f"still {job.status} at the deadline"


class Monitor(threading.Thread):
    """Every 0.2 s, images_done of the jobs in flight, read from their records in Redis (what
    GET /v1/jobs/{id} reads): a moment when some job's count grew is a moment the service made
    progress. Finer-grained than the clients' polls; it stays quiet while Redis is down."""

    def __init__(self, rec: Recorder, redis_url: str) -> None:
        super().__init__(daemon=True)
        import redis

        self.rec = rec
        self.redis = redis.Redis.from_url(redis_url, socket_timeout=1, socket_connect_timeout=1, decode_responses=True)
        self.load: Load | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        from redis.exceptions import RedisError

        from service.jobs import redis_keys

        seen: dict[str, int] = {}
        while not self.stopping.wait(0.2):
            ids = self.load.active_ids() if self.load else []
            if not ids:
                continue
            try:
                with self.redis.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.hget(redis_keys.job(job_id), "images_done")
                    values = pipe.execute()
            except RedisError:
                continue
            grew = False
            for job_id, value in zip(ids, values, strict=True):
                done = int(value or 0)
                grew |= done > seen.get(job_id, 0)
                seen[job_id] = done
            if grew:
                self.rec.progressed()


def work(jobs: list[Job], wall: float) -> dict:
    """What the phase's jobs asked for: images, and image-steps (the Denoiser's work), per second."""
    images = sum(j.body["num_images"] for j in jobs)
    steps = sum(j.body["num_images"] * j.body["steps"] for j in jobs)
    return {"images": images, "image_steps": steps, "image_steps_per_s": round(steps / wall, 1)}


def make_jobs(phase: str, n: int, size: Size, rng: random.Random) -> list[Job]:
    jobs = []
    for _ in range(n):
        body = {
            "model": "mnist",
            "num_images": rng.randint(*size.images),
            "steps": rng.randint(*size.steps),
            "sampler": "ddim",
            "class_label": rng.randint(0, 9),
            "seed": rng.randrange(2**32),
        }
        jobs.append(Job(phase, rng.choice("AB"), body, f"drill-{uuid.uuid4().hex}"))
    return jobs


# --- the stack ------------------------------------------------------------------------------------------
@dataclass
class Stack:
    redis: object  # service.dev.servers.RedisServer
    s3: object  # service.dev.servers.S3Server
    base_url: str
    settings: dict


def start_stack(work: Path, size: Size) -> Stack:
    import ray
    from ray import serve

    from service.app import AppArgs, build_app
    from service.dev.servers import RedisServer, S3Server, free_port
    from service.settings import Settings

    redis = RedisServer(work / "redis").start()
    s3 = S3Server(work / "s3", access_key=S3_KEY, secret_key=S3_SECRET).start()
    overrides = {
        "redis_url": redis.url,
        "s3_endpoint_url": s3.endpoint,
        "s3_access_key_id": S3_KEY,
        "s3_secret_access_key": S3_SECRET,
        "s3_bucket": BUCKET,
        "api_keys": [KEYS["A"], KEYS["B"]],
        "model_dir": str(ROOT / "models"),
        "shard_size": size.shard_size,
        "visibility_timeout_seconds": 10.0,
        "max_attempts": 3,
        "torch_threads": 1,
    }
    # per-key quotas, where this release has them: far above what the drill's clients can reach
    for name, value in (("max_jobs_in_flight_per_key", 10_000), ("max_submissions_per_minute_per_key", 100_000)):
        if name in Settings.model_fields:
            overrides[name] = value
    port = free_port()
    # address="local": always a new Ray of our own, even where another one runs on this machine
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = build_app(AppArgs(denoiser_replicas=1, worker_replicas=1, settings=overrides))
    serve.run(app, name="undiffuse", route_prefix="/")
    return Stack(redis, s3, f"http://127.0.0.1:{port}", overrides)


def stop_stack(stack: Stack | None) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    if stack is not None:
        stack.s3.stop()
        stack.redis.stop()


# --- phase 1: load with replica kills ------------------------------------------------------------------
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


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return None


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


def load_with_kills(stack: Stack, rec: Recorder, monitor: Monitor, size: Size, rng: random.Random):
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
    # a last mark near the end used to let the load run out before the replacement ran
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


# --- phases 2 and 3: Redis and S3 away mid-load ---------------------------------------------------------
def outage_under_load(stack: Stack, rec: Recorder, monitor: Monitor, size: Size, rng, phase: str, outage):
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


def redis_away(stack: Stack, rec: Recorder, gap_s: float) -> dict:
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


def s3_away(stack: Stack, rec: Recorder, size: Size, rng: random.Random) -> dict:
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


# --- phase 4: hostile requests ---------------------------------------------------------------------------
def hostile(stack: Stack, jobs: list[Job]) -> dict:
    ids = {k: [j.id for j in jobs if j.key == k and j.id] for k in "AB"}
    a_job = next(j for j in jobs if j.key == "A" and j.id)
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEYS['A']}"}) as c:
        a_cursor = c.get("/v1/jobs", params={"limit": 2}).json()["next_cursor"]
    host, port = stack.base_url.removeprefix("http://").split(":")
    answers = []
    for case in drill_hostile.cases(ids["A"], ids["B"], KEYS, a_cursor, a_job.idem, a_job.body):
        other = set(ids["B"]) if case.key == "A" else set(ids["A"]) if case.key == "B" else set(ids["A"] + ids["B"])
        answers.append(drill_hostile.judge(drill_hostile.send(host, int(port), case, KEYS), other))
    created = []
    for a in answers:  # the one that should make a job (B replaying A's Idempotency-Key)
        if a.status == 202:
            created += [m.decode() for m in drill_hostile.HEX_ID.findall(a.body)[:1]]
    return {
        "requests": len(answers),
        "by_status": dict(Counter(str(a.status) for a in answers)),
        "server_errors": [f"{a.case.name}: {a.status}" for a in answers if a.status is not None and a.status >= 500],
        "cross_key_reads": [f"{a.case.name}: {a.status}" for a in answers if a.cross_key],
        "no_answer": [f"{a.case.name}: {a.error}" for a in answers if a.status is None],
        "redirects": [f"{a.case.name}: {a.status} to {a.location}" for a in answers if a.location],
        "unexpected": [
            f"{a.case.name}: {a.status} (expected {sorted(a.case.expect)})" for a in answers if not a.expected
        ],
        "jobs_created": created,
    }


# --- verification ----------------------------------------------------------------------------------------
def bucket_objects(settings: dict) -> dict[str, set[str]]:
    """Every object in the bucket, by job id (the second part of jobs/{id}/{index:05d}.png)."""
    from service.settings import Settings
    from service.storage import ObjectStore

    client = ObjectStore(Settings(**settings)).client
    out: dict[str, set[str]] = defaultdict(set)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for o in page.get("Contents", []):
            parts = o["Key"].split("/")
            out[parts[1] if len(parts) == 3 and parts[0] == "jobs" else "<other>"].add(o["Key"])
    return out


def job_results(client: httpx.Client, job_id: str) -> tuple[str, list[int]]:
    """The job's status and the indices its view lists, in pages of RESULTS_PAGE where the API
    pages results (results_offset / results_next_offset; older releases ignore the parameters
    and list every result at once)."""
    indices: list[int] = []
    params = {"results_limit": RESULTS_PAGE}
    while True:
        r = client.get(f"/v1/jobs/{job_id}", params=params)
        if r.status_code != 200:
            return f"GET {r.status_code}", indices
        view = r.json()
        indices += [x["index"] for x in view["results"]]
        if view.get("results_next_offset") is None or len(indices) > view["progress"]["images_total"]:
            return view["status"], indices
        params["results_offset"] = view["results_next_offset"]


def png_ok(data: bytes, size: int) -> bool:
    try:
        from PIL import Image
    except ImportError:  # no Pillow: the signature and the IHDR's width and height
        return data[:8] == b"\x89PNG\r\n\x1a\n" and data[16:24] == size.to_bytes(4, "big") * 2
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        return image.size == (size, size)
    except Exception:
        return False


def verify(stack: Stack, jobs: list[Job], created_elsewhere: set[str]) -> dict:
    from service.settings import Settings
    from service.storage import ObjectStore, image_key, manifest_key

    objects = bucket_objects(stack.settings)
    accepted = [j for j in jobs if j.id]
    clients = {
        k: httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {v}"}) for k, v in KEYS.items()
    }
    with ThreadPoolExecutor(8) as pool:
        views = list(pool.map(lambda j: job_results(clients[j.key], j.id), accepted))
        size = clients["A"].get("/v1/models").json()["models"][0]["image_size"]
    for c in clients.values():
        c.close()
    out = Counter(manifests_missing=0, manifests_wrong=0)
    problems = []
    present = []
    manifests = []  # (job id, key, images) of succeeded jobs' manifest.json
    for job, (status, indices) in zip(accepted, views, strict=True):
        n = job.body["num_images"]
        expected = {image_key(job.id, i) for i in range(n)}
        found = objects.pop(job.id, set())
        if manifest_key(job.id) in found:  # a succeeded job's; checked against its images below
            found.discard(manifest_key(job.id))
            manifests.append((job.id, manifest_key(job.id), n))
        elif status == "succeeded":
            out["manifests_missing"] += 1
            problems.append(f"{job.phase} {job.id}: succeeded without a manifest")
        out["succeeded"] += status == "succeeded"
        out["lost"] += status == "GET 404"
        out["failed"] += status in ("failed", "canceled")
        out["unfinished"] += status in ("queued", "running")
        out["images_expected"] += n
        out["images_present"] += len(expected & found)
        out["images_missing"] += len(expected - found)
        out["objects_extra"] += len(found - expected)
        out["results_duplicated"] += len(indices) - len(set(indices))
        out["results_wrong"] += len(set(range(n)) ^ set(indices)) if status == "succeeded" else 0
        if status != "succeeded" or expected != found or sorted(indices) != list(range(n)):
            problems.append(f"{job.phase} {job.id}: {status}, {len(found)}/{n} objects, results {sorted(indices)}")
        present += sorted(expected & found)
    store = ObjectStore(Settings(**stack.settings)).client

    def check(key: str) -> tuple[bool, tuple[str, int]]:
        data = store.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        return png_ok(data, size), (hashlib.sha256(data).hexdigest(), len(data))

    with ThreadPoolExecutor(8) as pool:
        checked = dict(zip(present, pool.map(check, present), strict=True))
        listed = list(
            pool.map(lambda m: json.loads(store.get_object(Bucket=BUCKET, Key=m[1])["Body"].read()), manifests)
        )
    decoded = [ok for ok, _ in checked.values()]
    out["pngs_decoded"] = sum(decoded)
    out["pngs_bad"] = len(decoded) - sum(decoded)
    out["manifests"] = len(manifests)
    for (job_id, _, n), manifest in zip(manifests, listed, strict=True):
        entries = {e["key"]: (e["sha256"], e["size"]) for e in manifest["images"]}
        wrong = [k for k, v in entries.items() if checked.get(k, (None, None))[1] != v]
        if manifest["job_id"] != job_id or len(entries) != n or wrong:
            out["manifests_wrong"] += 1
            problems.append(f"job {job_id}: its manifest does not match its images")
    strays = {k: len(v) for k, v in objects.items() if k not in created_elsewhere}
    return {
        "jobs": len(jobs),
        "accepted": len(accepted),
        "not_accepted": [f"{j.phase}: {j.note}" for j in jobs if not j.id],
        **out,
        "objects_of_unknown_jobs": sum(strays.values()),
        "problems": problems[:50],
    }


# --- the whole drill ------------------------------------------------------------------------------------
def five_hundreds(rec: Recorder, gap: tuple[float, float]) -> dict:
    """5xx answers outside the Redis gap (any), inside it (anything but 503), and no-answers. A
    request is in the gap if it was answered after the kill and sent before the API was back."""

    def in_gap(c: Call) -> bool:
        return c.answered >= gap[0] and c.sent < gap[1]

    outside = [c for c in rec.calls if c.status is not None and c.status >= 500 and not in_gap(c)]
    inside_bad = [c for c in rec.calls if c.status not in (None, 503) and c.status >= 500 and in_gap(c)]
    no_answer = [c for c in rec.calls if c.status is None]
    missing_retry_after = [c for c in rec.calls if c.status in (429, 503) and not c.retry_after]
    return {
        "requests": len(rec.calls),
        "by_status": dict(Counter(str(c.status) for c in rec.calls)),
        "5xx_outside_redis_gap": len(outside),
        "5xx_outside_redis_gap_by_phase": dict(Counter(c.phase for c in outside)),
        "5xx_other_than_503_in_gap": len(inside_bad),
        "no_answer": len(no_answer),
        "no_answer_by_phase": dict(Counter(c.phase for c in no_answer)),
        "429_or_503_without_retry_after": len(missing_retry_after),
        "examples": [asdict(c) for c in (outside + inside_bad + no_answer)[:10]],
    }


def targets(result: dict) -> list[tuple[str, object, str, bool]]:
    v, h, calls = result["verification"], result["hostile"], result["http"]
    kills = result["load_with_kills"]["kills"]
    recovered = [k["recovery_s"] for k in kills if k.get("recovery_s") is not None]
    orphaned = [k for k in kills if k.get("orphaned_shards")]
    stranded = [k for k in orphaned if k.get("orphans_reclaimed_s") is None]
    rows = [
        ("jobs accepted", f"{v['accepted']} / {v['jobs']}", "all", v["accepted"] == v["jobs"]),
        ("jobs succeeded", v["succeeded"], f"{v['accepted']}", v["succeeded"] == v["accepted"]),
        ("jobs failed or canceled", v["failed"], "0", v["failed"] == 0),
        ("jobs lost (404) or unfinished", v["lost"] + v["unfinished"], "0", v["lost"] + v["unfinished"] == 0),
        (
            "images expected / present",
            f"{v['images_expected']} / {v['images_present']}",
            "equal",
            v["images_missing"] == 0,
        ),
        ("images missing", v["images_missing"], "0", v["images_missing"] == 0),
        (
            "manifests missing / not matching the images",
            f"{v.get('manifests_missing', 0)} / {v.get('manifests_wrong', 0)}",
            "0 / 0",
            not v.get("manifests_missing") and not v.get("manifests_wrong"),
        ),  # fmt: skip
        (
            "objects extra / results duplicated",
            f"{v['objects_extra']} / {v['results_duplicated']}",
            "0 / 0",
            v["objects_extra"] == 0 and v["results_duplicated"] == 0 and v["results_wrong"] == 0,
        ),  # fmt: skip
        (
            "PNGs downloaded and decoded",
            f"{v['pngs_decoded']} ok, {v['pngs_bad']} bad",
            "0 bad",
            v["pngs_bad"] == 0 and v["pngs_decoded"] == v["images_present"],
        ),  # fmt: skip
        ("replica kills recovered", f"{len(recovered)} / {len(kills)}", "all", len(recovered) == len(kills)),
        (
            "killed Workers' shards reclaimed",
            f"{len(orphaned) - len(stranded)} / {len(orphaned)} kills",
            "all",
            not stranded,
        ),  # fmt: skip
        ("5xx outside the Redis gap", calls["5xx_outside_redis_gap"], "0", calls["5xx_outside_redis_gap"] == 0),
        (
            "5xx other than 503 in the Redis gap",
            calls["5xx_other_than_503_in_gap"],
            "0",
            calls["5xx_other_than_503_in_gap"] == 0,
        ),  # fmt: skip
        (
            "429/503 without Retry-After",
            calls["429_or_503_without_retry_after"],
            "0",
            calls["429_or_503_without_retry_after"] == 0,
        ),  # fmt: skip
        ("requests without an HTTP answer", calls["no_answer"], "0", calls["no_answer"] == 0),
        ("hostile requests: 5xx", len(h["server_errors"]), "0", not h["server_errors"]),
        ("hostile requests: cross-key reads", len(h["cross_key_reads"]), "0", not h["cross_key_reads"]),
    ]
    return rows


def info_rows(result: dict) -> list[tuple[str, object]]:
    kills = result["load_with_kills"]["kills"]
    rows = [
        (f"{name}: wall time, images, image-steps/s", f"{p['wall_s']} s, {p['images']}, {p['image_steps_per_s']}")
        for name, p in (("load + kills", result["load_with_kills"]), ("Redis", result["redis"]), ("S3", result["s3"]))
    ]
    for kind in ("Worker", "Denoiser"):
        mine = [k for k in kills if k["kind"] == kind]
        for label, name in (("recovery", "recovery_s"), ("replacement running", "replacement_running_s")):
            vals = [k[name] for k in mine if k.get(name) is not None]
            if vals:
                rows.append((f"{kind} kill -9 x{len(mine)}: {label}", _spread(vals)))
        vals = [k["orphans_reclaimed_s"] for k in mine if k.get("orphans_reclaimed_s") is not None]
        if vals:
            held = sum(k.get("orphaned_shards") or 0 for k in mine)
            rows.append((f"{kind} kill -9: its {held} pending shards reclaimed", _spread(vals)))
        vals = [k["in_flight_jobs_done_s"] for k in mine if k.get("in_flight_jobs_done_s") is not None]
        if vals:
            rows.append((f"{kind} kill -9: jobs in flight at the kill all done", _spread(vals)))
    r = result["redis"]
    rows += [
        ("Redis kill -9: API answering 2xx again after", f"{r['api_back_s']} s"),
        ("Redis gap: responses by status", json.dumps(r["gap_responses"])),
        ("S3 outage: POST answers during it", json.dumps(result["s3"]["outage_post_responses"])),
        ("Redis: last job of the phase ended after the restart", f"{r.get('last_job_ended_after_restart_s')} s"),
        (
            "S3 outage: last job of the phase ended after S3 was back",
            f"{result['s3'].get('last_job_ended_after_restart_s')} s",
        ),
        ("hostile requests: answers by status", json.dumps(result["hostile"]["by_status"])),
        ("hostile requests: status other than expected", len(result["hostile"]["unexpected"])),
        ("all client requests by status", json.dumps(result["http"]["by_status"])),
    ]
    return rows


def _spread(values: list[float]) -> str:
    return (
        f"median {statistics.median(values):.1f} s, max {max(values):.1f} s ({', '.join(f'{v:.1f}' for v in values)})"
    )


def print_table(result: dict) -> None:
    cfg = result["config"]
    print(
        f"\n# fault drills ({cfg['size']}): {platform.node()}, {os.cpu_count()} CPUs, "
        f"{time.strftime('%Y-%m-%d')}, wall {result['wall_s']:.0f} s"
    )
    print("| outcome | value | target | |\n|---|---|---|---|")
    for name, value, target, ok in result["targets"]:
        print(f"| {name} | {value} | {target} | {'✔' if ok else '✘'} |")
    for name, value in result["info"]:
        print(f"| {name} | {value} | — | |")
    notes = ("unexpected", "no_answer", "redirects")
    for section, key in [("hostile", k) for k in notes] + [("verification", "problems")]:
        for line in result[section][key][:20]:
            print(f"  {section} {key}: {line}")


def run(size: Size, seed: int, label: str) -> dict:
    rng = random.Random(seed)
    rec = Recorder()
    work = Path(tempfile.mkdtemp(prefix="undiffuse-drills-"))
    stack = None
    result: dict = {"config": {"size": label, "seed": seed, **asdict(size)}}
    try:
        log(f"starting the stack in {work}")
        stack = start_stack(work, size)
        result["config"]["settings"] = {
            k: v for k, v in stack.settings.items() if "secret" not in k and k != "api_keys"
        }
        monitor = Monitor(rec, stack.redis.url)
        monitor.start()
        log(f"phase 1: {size.jobs} jobs from {size.clients} clients, {size.kills} + {size.kills} replica kills")
        rec.phase = "load+kills"
        jobs, result["load_with_kills"] = load_with_kills(stack, rec, monitor, size, rng)
        log(f"phase 2: {size.outage_jobs} jobs, Redis kill -9 and restart")
        rec.phase = "redis"
        more, window = outage_under_load(
            stack, rec, monitor, size, rng, "redis", lambda: redis_away(stack, rec, size.redis_gap_s)
        )
        jobs += more
        result["redis"] = redis_gap_report(rec, window)
        log(f"phase 3: {size.outage_jobs} jobs, S3 down for {size.s3_outage_s:g} s")
        rec.phase = "s3"
        more, window = outage_under_load(stack, rec, monitor, size, rng, "s3", lambda: s3_away(stack, rec, size, rng))
        jobs += more
        result["s3"] = s3_outage_report(rec, window)
        monitor.stopping.set()
        log("phase 4: 100 hostile requests")
        rec.phase = "hostile"
        result["hostile"] = hostile(stack, jobs)
        log("verifying every job's images")
        result["verification"] = verify(stack, jobs, set(result["hostile"]["jobs_created"]))
        result["http"] = five_hundreds(rec, (result["redis"]["killed_at_s"], result["redis"].pop("gap_end_s")))
    finally:
        stop_stack(stack)
    result["targets"] = targets(result)
    result["info"] = info_rows(result)
    result["ok"] = all(ok for *_, ok in result["targets"])
    result["wall_s"] = round(rec.now(), 1)
    if result["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work} (server logs)")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="the CI size (100 jobs, 2 + 2 kills, a 20 s S3 outage)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=None, help="for the job mix and the kill moments")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    result = run(SHORT if args.short else FULL, seed, "short" if args.short else "full")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
