"""What the drills' clients do and see: jobs submitted and polled by client threads (Load), every
HTTP exchange and every moment of progress (Recorder, Monitor), and the drill's sizes."""

from __future__ import annotations

import json
import random
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
KEYS = {"A": "drill-key-alice", "B": "drill-key-bob"}
S3_KEY, S3_SECRET = "drillaccess", "drill-secret-0123456789"
BUCKET = "undiffuse-drills"
TERMINAL = {"succeeded", "failed", "canceled"}
POLL_S = 1.0  # each client polls its job about once a second
WAIT_S = 300.0  # longest wait for a replacement replica, or for progress after it


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


def wait_until(predicate, timeout: float, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    return None
