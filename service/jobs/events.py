"""Job events: what GET /v1/jobs/{id}/events streams, kept as a Redis stream per job.

Each job has a stream (service.jobs.redis_keys.job_events) written by the very transitions that change
its record, in the same Lua script or MULTI/EXEC (service.jobs.store), so no event is missed and
none contradicts the record:

    queued      the submission (the first event of every job)
    started     queued -> running
    progress    {"step", "steps", "images_done", "images_total"} when they moved, at most one per
                PROGRESS_GAP_S per job (the Denoiser's step reports and shard completions), and
                always once more with the last step before `succeeded`; steps never go back (a
                retried shard restarting does not move the job's reported step down)
    preview     {"step", "steps", "index": 0, "png": base64} of the job's first image, every
                preview_every steps of jobs that asked for previews (the Denoiser); the stream
                keeps the newest PREVIEWS_KEPT while the job runs (a reader that follows it sees
                every one) and none once it has ended, so a job's pictures never sit in Redis
    succeeded, failed, canceled
                the terminal transition: exactly one, and nothing is appended after it

An entry holds `event` (the kind) and `data` (JSON, or empty where the reader renders the job
view from the record: queued, succeeded, failed, canceled). Its stream id ("<ms>-<seq>") is the
SSE event id, so `Last-Event-ID` resumes with XREAD after it. The stream lives as long as the
record (its TTL is copied from the record at every append) and is deleted with it; it is capped
at about MAX_EVENTS entries (the oldest progress of a very long job goes first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class EventKind(str, Enum):
    queued = "queued"
    started = "started"
    progress = "progress"
    preview = "preview"
    succeeded = "succeeded"
    failed = "failed"
    canceled = "canceled"

    @property
    def terminal(self) -> bool:
        return self in (EventKind.succeeded, EventKind.failed, EventKind.canceled)


MAX_EVENTS = 10_000
PROGRESS_GAP_S = 0.25  # at most ~4 progress events a second per job
EVENT_ID = re.compile(r"(?P<ms>[0-9]{1,20})-(?P<seq>[0-9]{1,20})")  # a Redis stream entry id


def is_event_id(text: str) -> bool:
    """Whether text is a stream entry id Redis accepts: two unsigned 64-bit numbers."""
    match = EVENT_ID.fullmatch(text)
    return bool(match) and int(match["ms"]) < 2**64 and int(match["seq"]) < 2**64


STARTED_DATA = '{"status": "running"}'


@dataclass(frozen=True)
class JobEvent:
    id: str  # the stream entry id
    kind: EventKind
    data: str  # JSON, or "" where the reader renders the job view


MAX_PREVIEWS = 100  # per job: previews are the stream's largest entries (a PNG each)
PREVIEWS_KEPT = 4  # in the stream at a time, while the job runs


def default_preview_every(steps: int) -> int:
    """Steps between previews when a job asks for previews without saying: about 8 per job."""
    return max(1, steps // 8)


# Lua helpers for the store's scripts. emit(job, events, kind, data) appends an entry, gives
# the stream the record's remaining lifetime and returns the entry's id; keep_preview(job,
# events, previews, id) lists a preview's id and drops the oldest past PREVIEWS_KEPT;
# drop_previews(events, previews) removes every listed preview (the job has ended); progress(job, events, now_ms, force) appends a
# progress event if the job's (step, images_done) moved since the last one and, unless forced,
# PROGRESS_GAP_S has passed since it. The record's ev_step / ev_done / ev_at fields remember the
# last progress event; the step reported is the shards' average (as JobRecord.step), never less
# than the last one reported, and every step when forced (the job has succeeded).
LUA = f"""
local function emit(job, events, kind, data)
  local id = redis.call('XADD', events, 'MAXLEN', '~', {MAX_EVENTS}, '*', 'event', kind, 'data', data)
  local ttl = redis.call('PTTL', job)
  if ttl > 0 then redis.call('PEXPIRE', events, ttl) end
  return id
end

local function keep_preview(job, events, previews, id)
  redis.call('RPUSH', previews, id)
  while redis.call('LLEN', previews) > {PREVIEWS_KEPT} do
    redis.call('XDEL', events, redis.call('LPOP', previews))
  end
  local ttl = redis.call('PTTL', job)
  if ttl > 0 then redis.call('PEXPIRE', previews, ttl) end
end

local function drop_previews(events, previews)
  local ids = redis.call('LRANGE', previews, 0, -1)
  if #ids > 0 then redis.call('XDEL', events, unpack(ids)) end
  redis.call('DEL', previews)
end

local function progress(job, events, now_ms, force)
  local at = redis.call('HGET', job, 'ev_at')
  if not force and at and tonumber(now_ms) - tonumber(at) < {int(PROGRESS_GAP_S * 1000)} then return end
  local raw = redis.call('HGETALL', job)
  local h = {{}}
  local sum = 0
  for i = 1, #raw, 2 do
    h[raw[i]] = raw[i + 1]
    if string.sub(raw[i], 1, 5) == 'step:' then sum = sum + tonumber(raw[i + 1]) end
  end
  local params = cjson.decode(h['params'])
  local steps = tonumber(params['steps'])
  local step = math.floor(sum / math.max(1, tonumber(h['num_shards'])))
  if force then step = steps end
  step = math.max(step, tonumber(h['ev_step'] or '0'))
  local done = tonumber(h['images_done'] or '0')
  if tostring(step) == h['ev_step'] and tostring(done) == h['ev_done'] then return end
  redis.call('HSET', job, 'ev_step', step, 'ev_done', done, 'ev_at', now_ms)
  emit(job, events, 'progress', string.format(
    '{{"step": %d, "steps": %d, "images_done": %d, "images_total": %d}}',
    step, steps, done, tonumber(params['num_images'])))
end
"""
