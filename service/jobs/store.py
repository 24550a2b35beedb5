"""Job records in Redis, and every state transition of a job.

A job is a HASH (service.jobs.redis_keys.job) with the fields
    params        JSON of JobParams          owner        who submitted it
    status        a JobStatus value          created_at / started_at / finished_at   epoch seconds
    num_shards    shards the job was cut in  shard_size   images per shard when it was cut
    images_done   images uploaded so far     error        JSON {"code", "message"}
    step:{k}      denoising steps done by shard k
    webhook_url, webhook_events   where and for which events deliveries go (service.jobs.webhook_schedule)
    queue_mark    its owner's cost queued before it; queue_ahead / queue_start_at: the
                  position and estimated start last answered (service.jobs.queue)
plus a SET of finished shard indices, a HASH of the finished shards' file checksums (for the
manifest), the job's event stream (service.jobs.events) and its webhook outcomes.

State changes go through Lua scripts with named keys and arguments (service.jobs.scripts) so
that they are atomic and guarded: a canceled or finished job never goes back to running, and
repeating a shard's completion is harmless; each script appends the job's events with the change
it makes, so the event stream and the record never disagree, and schedules the webhook
deliveries the change calls for (service.jobs.webhook_schedule) in the same script. The shards
themselves travel on the queue (service.jobs.queue), which a submission writes in the same
MULTI/EXEC as the record, with the job's entry in the purge schedule (service.jobs.purge). Side
effects of a job reaching a terminal state belong to service.jobs.lifecycle, which drives the
terminal transitions here.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.exceptions import WatchError

from service.jobs import events, redis_keys, webhook_schedule
from service.jobs.connection import async_redis
from service.jobs.events import JobEvent
from service.jobs.purge import PurgeSchedule
from service.jobs.queue import ShardQueue
from service.jobs.records import JobError, JobParams, JobStatus, ShardTask
from service.jobs.scripts import Script
from service.jobs.webhook_schedule import WebhookOutcome, WebhookSchedule
from service.settings import Settings

# Every transition keeps the owner's status index (service.jobs.redis_keys.owner_status_jobs) in
# step with the record: reindex(index, job, job_id, from, to) moves the job between the owner's
# sets, `index` being those sets in the order of `index_keys` (all jobs, then one per status).
_STATUS_SLOTS = ", ".join(f"{status.value} = {slot}" for slot, status in enumerate(JobStatus, start=2))
_INDEX = f"""
local STATUS_SLOT = {{{_STATUS_SLOTS}}}
local function reindex(index, job, job_id, from, to)
  local score = redis.call('ZSCORE', index[1], job_id)
  redis.call('ZREM', index[STATUS_SLOT[from]], job_id)
  if score then
    local target = index[STATUS_SLOT[to]]
    redis.call('ZADD', target, score, job_id)
    -- the index lives as long as its newest record
    local ttl = redis.call('PTTL', job)
    if ttl > redis.call('PTTL', target) then redis.call('PEXPIRE', target, ttl) end
  end
end
"""


# What every status transition's script starts with: the owner's status index, the job's event
# stream and its webhook schedule, kept in step with the record in the same script.
_TRANSITION = _INDEX + events.LUA + webhook_schedule.LUA

# Returns 1 when queued -> running, 0 when already running, -1 otherwise.
_START = Script(
    _TRANSITION
    + """
local s = redis.call('HGET', job, 'status')
if s == 'queued' then
  redis.call('HSET', job, 'status', 'running', 'started_at', now)
  reindex(index, job, job_id, 'queued', 'running')
  emit(job, events, 'started', '{"status": "running"}')
  webhook(job, hooks, due, job_id, 'started', now)
  return 1
elseif s == 'running' then return 0 end
return -1
""",
    keys=["job", "events", "hooks", "due", "*index"],
    args=["now", "job_id"],
)

# done: the job's finished shards; files: their checksums; usage: the job's stored bytes;
# stored: its owner's. checksums: the shard's files JSON ('' for none); bytes: the shard's;
# usage_ttl: the usage's lifetime (s). Counts the shard's images (and, while the job is active,
# its bytes against the owner) the first time only. Returns {status, 1 if every shard of the
# active job is done now}: the caller then writes the manifest and moves the job to succeeded
# (_SUCCEED), so a job is never succeeded without its manifest.
_COMPLETE_SHARD = Script(
    events.LUA
    + """
local s = redis.call('HGET', job, 'status')
if not s then return {'missing', 0} end
local active = s == 'queued' or s == 'running'
if redis.call('SADD', done, shard) == 1 then
  redis.call('HINCRBY', job, 'images_done', count)
  redis.call('HSET', job, 'step:' .. shard, steps)
  redis.call('EXPIRE', done, ttl)
  if checksums ~= '' and active then  -- an ended job keeps no checksums
    redis.call('HSET', files, shard, checksums)
    redis.call('EXPIRE', files, ttl)
  end
  if tonumber(bytes) > 0 and active then  -- an ended job's images are purged
    redis.call('HSET', usage, 'owner', owner)
    redis.call('HINCRBY', usage, 'bytes', bytes)
    redis.call('EXPIRE', usage, usage_ttl)
    redis.call('INCRBY', stored, bytes)
    redis.call('EXPIRE', stored, usage_ttl)
  end
end
if active then
  progress(job, events, now_ms, false)
  if redis.call('SCARD', done) >= tonumber(redis.call('HGET', job, 'num_shards')) then return {s, 1} end
end
return {s, 0}
""",
    keys=["job", "done", "events", "files", "usage", "stored"],
    args=["shard", "count", "steps", "ttl", "checksums", "now_ms", "owner", "bytes", "usage_ttl"],
)

# Moves an active job whose shards are all done to succeeded, with its last progress and its
# terminal event, and drops what an ended job no longer needs in Redis: its previews and its
# files' checksums (the manifest, written to the bucket before this, holds them). Returns 1 if
# it moved the job.
_SUCCEED = Script(
    _TRANSITION
    + """
local s = redis.call('HGET', job, 'status')
if (s == 'queued' or s == 'running') and
   redis.call('SCARD', done) >= tonumber(redis.call('HGET', job, 'num_shards')) then
  redis.call('HSET', job, 'status', 'succeeded', 'finished_at', now)
  reindex(index, job, job_id, s, 'succeeded')
  progress(job, events, now_ms, true)
  emit(job, events, 'succeeded', '')
  webhook(job, hooks, due, job_id, 'succeeded', now)
  drop_previews(events, previews)
  redis.call('DEL', files)
  return 1
end
return 0
""",
    keys=["job", "done", "events", "hooks", "due", "previews", "files", "*index"],
    args=["now", "now_ms", "job_id"],
)

# status: the terminal one; error_json: '' for none. Returns 1 if it moved the job (and appended
# its terminal event; its previews and checksums go: its images are purged).
_FINISH = Script(
    _TRANSITION
    + """
local s = redis.call('HGET', job, 'status')
if s == 'queued' or s == 'running' then
  redis.call('HSET', job, 'status', status, 'finished_at', now)
  if error_json ~= '' then redis.call('HSET', job, 'error', error_json) end
  reindex(index, job, job_id, s, status)
  emit(job, events, status, '')
  webhook(job, hooks, due, job_id, status, now)
  drop_previews(events, previews)
  redis.call('DEL', files)
  return 1
end
return 0
""",
    keys=["job", "events", "hooks", "due", "previews", "files", "*index"],
    args=["status", "now", "error_json", "job_id"],
)

# Deletes a finished job's record, events, webhook outcomes (and their pending deliveries) and
# index entries. Returns the status it had ('missing' if none); an active job is left alone.
_DELETE = Script(
    """
local s = redis.call('HGET', job, 'status')
if not s then return 'missing' end
if s == 'queued' or s == 'running' then return s end
for _, event in ipairs(redis.call('HKEYS', hooks)) do redis.call('ZREM', due, job_id .. ':' .. event) end
redis.call('DEL', job, done, events, files, hooks, previews)
for _, key in ipairs(index) do redis.call('ZREM', key, job_id) end
return s
""",
    keys=["job", "done", "events", "files", "hooks", "due", "previews", "*index"],
    args=["job_id"],
)

# shards: (job hash, done-shards set, events) per shard, flattened; shard_steps: (shard, step)
# per shard, flattened. Records each shard's step on jobs that still exist, unless the shard is
# already done (a duplicate attempt must not move a finished shard's progress back), appends a
# progress event per running job where due, and returns the jobs' statuses (false for a missing
# job).
_RECORD_STEPS = Script(
    events.LUA
    + """
local out = {}
local n = #shards / 3
for i = 1, n do
  local job, done, shard = shards[3 * i - 2], shards[3 * i - 1], shard_steps[2 * i - 1]
  local s = redis.call('HGET', job, 'status')
  if s and redis.call('SISMEMBER', done, shard) == 0 then
    redis.call('HSET', job, 'step:' .. shard, shard_steps[2 * i])
  end
  out[i] = s
end
local seen = {}
for i = 1, n do  -- after every shard's step is in: one event per job, with all of them
  local job = shards[3 * i - 2]
  if out[i] == 'running' and not seen[job] then
    seen[job] = true
    progress(job, shards[3 * i], now_ms, false)
  end
end
return out
""",
    keys=["*shards"],
    args=["now_ms", "*shard_steps"],
)

# step: the preview's; data: its JSON. Appended only while the job runs (never after its
# terminal event) and past the last preview's step (a retried first shard starts again from
# step 0; its previews rejoin the stream once they are ahead of what the stream has shown).
# Returns 1 if appended.
_PREVIEW = Script(
    events.LUA
    + """
if redis.call('HGET', job, 'status') ~= 'running' then return 0 end
local at = tonumber(step)
if at <= (tonumber(redis.call('HGET', job, 'preview_step')) or -1) then return 0 end
redis.call('HSET', job, 'preview_step', at)
keep_preview(job, events, previews, emit(job, events, 'preview', data))
return 1
""",
    keys=["job", "events", "previews"],
    args=["step", "data"],
)


# usage: a job's stored bytes, stored: its owner's. Gives the job's bytes back, once.
_RELEASE = Script(
    """
local bytes = redis.call('HGET', usage, 'bytes')
if bytes then redis.call('DECRBY', stored, bytes) end
redis.call('DEL', usage)
return 0
""",
    keys=["usage", "stored"],
)


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before with a different body."""


class JobNotFound(Exception):
    pass


class TooManyJobsInFlight(Exception):
    """The owner already has its limit of queued and running jobs."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} jobs already queued or running")
        self.limit = limit


class TooManyJobsStored(Exception):
    """The owner already has its limit of job records (of any status) in Redis."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"{limit} jobs stored")
        self.limit = limit


class CostInFlightExceeded(Exception):
    """The job would take the owner's queued and running jobs past its image-steps quota."""

    def __init__(self, in_flight: int, limit: int) -> None:
        super().__init__(f"{in_flight} image-steps queued or running; the limit is {limit}")
        self.in_flight, self.limit = in_flight, limit


USAGE_GRACE_SECONDS = 2 * 24 * 3600  # a job's usage outlives its record until the sweeper purges it

Cursor = tuple[int, str]
"""A position in an owner's job list: (creation score, job id) of the last job returned."""


class JobFinished(Exception):
    """The job is already in a terminal state."""

    def __init__(self, status: JobStatus) -> None:
        super().__init__(f"job already {status.value}")
        self.status = status


@dataclass
class JobRecord:
    id: str
    owner: str
    status: JobStatus
    params: JobParams
    created_at: float
    started_at: float | None
    finished_at: float | None
    error: JobError | None
    num_shards: int
    shard_size: int
    images_done: int
    shard_steps: dict[int, int]
    done_shards: set[int]
    webhook_url: str | None = None
    webhook_events: list[str] = field(default_factory=list)
    webhooks: list[WebhookOutcome] = field(default_factory=list)  # each subscribed event's delivery so far

    def shard_range(self, shard: int) -> tuple[int, int]:
        """(start, count) of one shard, as the job was cut when it was submitted."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"job {self.id} has no shard {shard} (it has {self.num_shards})")
        return shard_range(self.params.num_images, self.shard_size, shard)

    @property
    def step(self) -> int:
        """Denoising steps done, averaged over the job's shards."""
        if self.status == JobStatus.succeeded:
            return self.params.steps
        return sum(self.shard_steps.values()) // max(1, self.num_shards)


def body_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _ending_keys(job_id: str, owner: str) -> dict[str, str | list[str]]:
    """The keys a transition that ends a job writes (succeed and finish alike): the record, its
    events, its webhook outcomes and the due set, what it drops (previews, checksums) and the
    owner's status index."""
    return {
        "job": redis_keys.job(job_id),
        "events": redis_keys.job_events(job_id),
        "hooks": redis_keys.job_webhooks(job_id),
        "due": redis_keys.WEBHOOKS_DUE,
        "previews": redis_keys.job_previews(job_id),
        "files": redis_keys.job_files(job_id),
        "index": index_keys(owner),
    }


def shard_range(num_images: int, shard_size: int, shard: int) -> tuple[int, int]:
    """(start, count) of shard k when num_images are cut in shards of at most shard_size."""
    start = shard * shard_size
    return start, min(shard_size, num_images - start)


def index_keys(owner: str) -> list[str]:
    """The owner's job sets in the order the transition scripts take them (see _INDEX): all
    jobs, then one per status."""
    return [redis_keys.owner_jobs(owner), *(redis_keys.owner_status_jobs(owner, s.value) for s in JobStatus)]


def shard_ranges(num_images: int, shard_size: int) -> list[tuple[int, int]]:
    """[(start, count)] covering 0..num_images-1 in shards of at most shard_size."""
    return [shard_range(num_images, shard_size, k) for k in range(math.ceil(num_images / shard_size))]


class JobStore:
    """Job records on one Redis client; `queue` is the shard queue on the same client.

    shard_size: images per shard for jobs submitted through this store (stored on each record,
    so a later change of the setting never changes an existing job's shards)."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int, shard_size: int, quantum: int | None = None) -> None:
        self.r = client
        self.ttl = ttl_seconds
        self.shard_size = shard_size
        self.queue = ShardQueue(client) if quantum is None else ShardQueue(client, quantum)
        self.webhooks = WebhookSchedule(client)
        self.purges = PurgeSchedule(client)
        self._start = _START.register(client)
        self._complete = _COMPLETE_SHARD.register(client)
        self._succeed = _SUCCEED.register(client)
        self._preview = _PREVIEW.register(client)
        self._finish = _FINISH.register(client)
        self._record_steps = _RECORD_STEPS.register(client)
        self._delete = _DELETE.register(client)
        self._release = _RELEASE.register(client)

    @classmethod
    def from_url(
        cls, url: str, ttl_seconds: int, shard_size: int, timeout: float = 2.0, quantum: int | None = None
    ) -> JobStore:
        return cls(async_redis(url, timeout), ttl_seconds, shard_size, quantum)

    @classmethod
    def from_settings(cls, settings: Settings, client: aioredis.Redis | None = None) -> JobStore:
        """The store as the settings describe it (record lifetime, shard size, queue quantum), on
        `client` or on a new client of settings.redis_url."""
        if client is None:
            client = async_redis(settings.redis_url, settings.redis_timeout_seconds)
        return cls(client, settings.job_ttl_seconds, settings.shard_size, settings.queue_quantum)

    async def close(self) -> None:
        await self.r.aclose()

    async def ping(self) -> None:
        await self.r.ping()

    # --- submit --------------------------------------------------------------------------------
    async def submit(
        self,
        owner: str,
        params: JobParams,
        body: dict,
        idempotency_key: str | None = None,
        max_in_flight: int | None = None,
        webhook: tuple[str, list[str]] | None = None,
        max_cost_in_flight: int | None = None,
        max_stored: int | None = None,
    ) -> tuple[str, bool, float]:
        """Create the job and enqueue its shards in one MULTI/EXEC. Returns (job id, created,
        created_at).

        With an idempotency key, the same key and body return the first job (created=False);
        the same key with another body raises IdempotencyConflict. With max_in_flight, an owner
        who has that many jobs queued or running gets TooManyJobsInFlight (checked in the same
        transaction, so concurrent submissions cannot overshoot it); with max_cost_in_flight, a
        job that would take the image-steps of the owner's queued and running jobs past it gets
        CostInFlightExceeded (the same way); with max_stored, an owner whose records (any status,
        not yet expired or deleted) number that many gets TooManyJobsStored. webhook: (url,
        events) to deliver to (service.jobs.webhook_schedule).
        """
        digest = body_hash(body)
        idem = redis_keys.idempotency(owner, idempotency_key) if idempotency_key else None
        active = [redis_keys.owner_status_jobs(owner, s.value) for s in (JobStatus.queued, JobStatus.running)]
        job_id = uuid.uuid4().hex
        now = time.time()
        shards = shard_ranges(params.num_images, self.shard_size)
        limited = max_in_flight is not None or max_cost_in_flight is not None or max_stored is not None
        if limited:
            await self._prune(owner)
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    every = redis_keys.owner_jobs(owner)
                    watched = [*(active + [every] if limited else []), *([idem] if idem else [])]
                    if watched:
                        await pipe.watch(*watched)
                    if idem:
                        prior = await pipe.get(idem)
                        if prior is not None:
                            prior = json.loads(prior)
                            if prior["body_hash"] != digest:
                                raise IdempotencyConflict(idempotency_key)
                            return prior["job_id"], False, 0.0
                    if max_stored is not None and await pipe.zcard(every) >= max_stored:
                        raise TooManyJobsStored(max_stored)
                    if limited:
                        await self._check_in_flight(pipe, active, params, max_in_flight, max_cost_in_flight)
                    pipe.multi()
                    if idem:
                        pipe.set(idem, json.dumps({"job_id": job_id, "body_hash": digest}), ex=self.ttl)
                    await self._queue_job(pipe, job_id, owner, params, now, shards, webhook)
                    await pipe.execute()
                    return job_id, True, now
                except WatchError:
                    continue  # a concurrent request used the same key: read its job

    @staticmethod
    async def _check_in_flight(
        pipe, active: list[str], params: JobParams, max_jobs: int | None, max_cost: int | None
    ) -> None:
        """Raise if the owner's queued and running jobs (read while the pipeline watches their
        index) leave no room for one more of these params."""
        job_ids = [job_id for key in active for job_id in await pipe.zrange(key, 0, -1)]
        if max_jobs is not None and len(job_ids) >= max_jobs:
            raise TooManyJobsInFlight(max_jobs)
        if max_cost is not None:
            cost = 0
            for job_id in job_ids:  # at most max_jobs_in_flight_per_key of them
                raw = await pipe.hget(redis_keys.job(job_id), "params")
                cost += JobParams.model_validate_json(raw).cost if raw is not None else 0
            if cost + params.cost > max_cost:
                raise CostInFlightExceeded(cost, max_cost)

    async def replayed(self, owner: str, idempotency_key: str, body: dict) -> str | None:
        """The job an earlier request with this Idempotency-Key and body made, or None (then
        `submit` decides, in its transaction); IdempotencyConflict for another body."""
        prior = await self.r.get(redis_keys.idempotency(owner, idempotency_key))
        if prior is None:
            return None
        prior = json.loads(prior)
        if prior["body_hash"] != body_hash(body):
            raise IdempotencyConflict(idempotency_key)
        return prior["job_id"]

    async def _queue_job(self, pipe, job_id: str, owner: str, params: JobParams, now: float, shards, webhook) -> None:
        key = redis_keys.job(job_id)
        hook = (
            {"webhook_url": webhook[0], "webhook_events": webhook_schedule.encode_events(webhook[1])} if webhook else {}
        )
        pipe.hset(
            key,
            mapping={
                "params": params.model_dump_json(),
                "owner": owner,
                "status": JobStatus.queued.value,
                "created_at": repr(now),
                "num_shards": len(shards),
                "shard_size": self.shard_size,
                "images_done": 0,
                **hook,
            },
        )
        pipe.expire(key, self.ttl)
        stream = redis_keys.job_events(job_id)
        pipe.xadd(stream, {"event": events.EventKind.queued.value, "data": ""}, maxlen=events.MAX_EVENTS)
        pipe.expire(stream, self.ttl)
        score = int(now * 1e6)
        for index in (redis_keys.owner_jobs(owner), redis_keys.owner_status_jobs(owner, JobStatus.queued.value)):
            pipe.zadd(index, {job_id: score})
            pipe.expire(index, self.ttl)
        self.purges.schedule_in(pipe, job_id, now + self.ttl)  # its images go when its record does
        tasks = [
            ShardTask(job_id=job_id, shard=k, start=start, count=count, owner=owner, params=params)
            for k, (start, count) in enumerate(shards)
        ]
        await self.queue.enqueue(pipe, key, owner, tasks)

    # --- read ----------------------------------------------------------------------------------
    async def get(self, job_id: str) -> JobRecord | None:
        return (await self.get_many([job_id]))[0]

    async def get_many(self, job_ids: list[str]) -> list[JobRecord | None]:
        """The records of job_ids in one round trip (None where a job does not exist)."""
        if not job_ids:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hgetall(redis_keys.job(job_id))
                pipe.smembers(redis_keys.job_done_shards(job_id))
                pipe.hgetall(redis_keys.job_webhooks(job_id))
            replies = await pipe.execute()
        return [self._record(job_id, *replies[3 * i : 3 * i + 3]) for i, job_id in enumerate(job_ids)]

    def _record(self, job_id: str, raw: dict, done: set, hooks: dict) -> JobRecord | None:
        if not raw or "params" not in raw:
            return None
        err = raw.get("error")
        return JobRecord(
            id=job_id,
            owner=raw["owner"],
            status=JobStatus(raw["status"]),
            params=JobParams.model_validate_json(raw["params"]),
            created_at=float(raw["created_at"]),
            started_at=float(raw["started_at"]) if raw.get("started_at") else None,
            finished_at=float(raw["finished_at"]) if raw.get("finished_at") else None,
            error=JobError.model_validate_json(err) if err else None,
            num_shards=int(raw["num_shards"]),
            shard_size=int(raw["shard_size"]),
            images_done=int(raw.get("images_done", 0)),
            shard_steps={int(k[5:]): int(v) for k, v in raw.items() if k.startswith("step:")},
            done_shards={int(s) for s in done},
            webhook_url=raw.get("webhook_url"),
            webhook_events=webhook_schedule.decode_events(raw.get("webhook_events")),
            webhooks=webhook_schedule.outcomes(hooks),
        )

    async def get_owned(self, job_id: str, owner: str) -> JobRecord:
        record = await self.get(job_id)
        if record is None or record.owner != owner:
            raise JobNotFound(job_id)
        return record

    async def list_owned(
        self, owner: str, status: JobStatus | None, limit: int, cursor: Cursor | None
    ) -> tuple[list[JobRecord], Cursor | None]:
        """The owner's jobs newest first, optionally of one status (read from the status index,
        so a filter costs what its page costs); cursor: the position after which to continue.
        Jobs created in the same microsecond are ordered by id, so none is skipped or repeated."""
        key = redis_keys.owner_status_jobs(owner, status.value) if status else redis_keys.owner_jobs(owner)
        await self._prune(owner)
        out: list[JobRecord] = []
        top, offset = (cursor[0] if cursor else "+inf"), 0
        while len(out) < limit:
            page = await self.r.zrevrangebyscore(key, top, "-inf", start=offset, num=limit + 1, withscores=True)
            if not page:
                return out, None
            offset += len(page)
            after = [(int(score), job_id) for job_id, score in page if cursor is None or (int(score), job_id) < cursor]
            for (score, job_id), record in zip(after, await self.get_many([j for _, j in after]), strict=True):
                if record is None:
                    continue  # expired since the last prune
                out.append(record)
                if len(out) == limit:
                    return out, (score, job_id)
        return out, None

    async def _prune(self, owner: str) -> None:
        """Drop index entries of jobs older than the record lifetime (their records expired)."""
        oldest = int((time.time() - self.ttl) * 1e6)
        async with self.r.pipeline(transaction=False) as pipe:
            for key in index_keys(owner):
                pipe.zremrangebyscore(key, "-inf", f"({oldest}")
            await pipe.execute()

    # --- deletion ------------------------------------------------------------------------------
    async def delete(self, job_id: str, owner: str) -> JobStatus | None:
        """Delete a finished job's record; returns the status it had (an active one is left as it
        is), or None if there was no such job. The objects are the caller's (ObjectStore)."""
        status = await self._delete(
            job=redis_keys.job(job_id),
            done=redis_keys.job_done_shards(job_id),
            events=redis_keys.job_events(job_id),
            files=redis_keys.job_files(job_id),
            hooks=redis_keys.job_webhooks(job_id),
            due=redis_keys.WEBHOOKS_DUE,
            previews=redis_keys.job_previews(job_id),
            index=index_keys(owner),
            job_id=job_id,
        )
        return None if status == "missing" else JobStatus(status)

    async def release_storage(self, job_id: str) -> None:
        """The job's objects are deleted: give its bytes back to its owner (once)."""
        owner = await self.r.hget(redis_keys.job_usage(job_id), "owner")
        if owner is not None:
            await self._release(usage=redis_keys.job_usage(job_id), stored=redis_keys.owner_stored_bytes(owner))

    async def stored_bytes(self, owner: str) -> int:
        """Bytes of the owner's images in the bucket, as counted by completed shards."""
        return max(0, int(await self.r.get(redis_keys.owner_stored_bytes(owner)) or 0))

    # --- transitions ---------------------------------------------------------------------------
    async def mark_running(self, job_id: str, owner: str) -> int:
        """1: queued -> running now; 0: it was running; -1: finished or gone."""
        return int(
            await self._start(
                job=redis_keys.job(job_id),
                events=redis_keys.job_events(job_id),
                hooks=redis_keys.job_webhooks(job_id),
                due=redis_keys.WEBHOOKS_DUE,
                index=index_keys(owner),
                now=repr(time.time()),
                job_id=job_id,
            )
        )

    async def complete_shard(self, task: ShardTask, files: list[tuple[str, int]] | None = None) -> tuple[str, bool]:
        """Record the shard done (its images counted once, however often this repeats), with its
        PNGs' (sha256 hex, size) in image order. Returns (status, whether every shard of the
        active job is done): then the caller writes the manifest and calls `succeed`."""
        status, all_done = await self._complete(
            job=redis_keys.job(task.job_id),
            done=redis_keys.job_done_shards(task.job_id),
            events=redis_keys.job_events(task.job_id),
            files=redis_keys.job_files(task.job_id),
            usage=redis_keys.job_usage(task.job_id),
            stored=redis_keys.owner_stored_bytes(task.owner or ""),
            shard=task.shard,
            count=task.count,
            steps=task.params.steps,
            ttl=self.ttl,
            checksums=json.dumps(files) if files is not None else "",
            now_ms=_now_ms(),
            owner=task.owner or "",
            bytes=sum(size for _, size in files or []) if task.owner else 0,
            usage_ttl=self.ttl + USAGE_GRACE_SECONDS,
        )
        return status, bool(all_done)

    async def succeed(self, job_id: str, owner: str) -> bool:
        """Move an active job whose shards are all done to succeeded; False if it was not active
        or not done."""
        return bool(
            await self._succeed(
                done=redis_keys.job_done_shards(job_id),
                **_ending_keys(job_id, owner),
                now=repr(time.time()),
                now_ms=_now_ms(),
                job_id=job_id,
            )
        )

    async def files(self, record: JobRecord) -> dict[int, tuple[str, int]]:
        """{image index: (sha256 hex, size)} of the finished shards that recorded them."""
        raw = await self.r.hgetall(redis_keys.job_files(record.id))
        out: dict[int, tuple[str, int]] = {}
        for shard, value in raw.items():
            start, count = record.shard_range(int(shard))
            entries = json.loads(value)
            if len(entries) == count:
                out.update({start + k: (sha, int(size)) for k, (sha, size) in enumerate(entries)})
        return out

    async def finish(self, job_id: str, owner: str, status: JobStatus, error: JobError | None = None) -> bool:
        """Move an active job to a terminal status; False if it was already terminal."""
        err = error.model_dump_json() if error else ""
        return bool(
            await self._finish(
                **_ending_keys(job_id, owner),
                status=status.value,
                now=repr(time.time()),
                error_json=err,
                job_id=job_id,
            )
        )

    async def record_steps(self, progress: list[tuple[str, int, int]]) -> list[JobStatus | None]:
        """Record each (job id, shard, steps done) in one round trip and return each job's status
        (None for a job that no longer exists), so the caller learns of cancellations at the
        same time."""
        if not progress:
            return []
        statuses = await self._record_steps(
            shards=[
                k
                for job_id, _, _ in progress
                for k in (redis_keys.job(job_id), redis_keys.job_done_shards(job_id), redis_keys.job_events(job_id))
            ],
            now_ms=_now_ms(),
            shard_steps=[v for _, shard, step in progress for v in (shard, step)],
        )
        return [JobStatus(s) if s else None for s in statuses]

    # --- events --------------------------------------------------------------------------------
    async def add_preview(self, job_id: str, step: int, data: str) -> bool:
        """Append a preview event (JSON data) of `step` while the job runs; False once it has
        ended, or when an earlier step comes after a later one (a retried shard)."""
        return bool(
            await self._preview(
                job=redis_keys.job(job_id),
                events=redis_keys.job_events(job_id),
                previews=redis_keys.job_previews(job_id),
                step=step,
                data=data,
            )
        )

    async def read_events(
        self, job_id: str, after: str, count: int = 100, block_ms: int | None = None
    ) -> list[JobEvent]:
        """Up to count of the job's events after the event id `after` ("0" for all), oldest
        first; with block_ms, waits up to that long for one to arrive."""
        reply = await self.r.xread({redis_keys.job_events(job_id): after}, count=count, block=block_ms)
        return [
            JobEvent(entry_id, events.EventKind(fields["event"]), fields.get("data", ""))
            for _stream, entries in reply or []
            for entry_id, fields in entries
        ]


def _now_ms() -> int:
    return int(time.time() * 1000)
