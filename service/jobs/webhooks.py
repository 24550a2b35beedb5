"""The durable webhook schedule: which deliveries are due, and each one's outcome, in Redis.

A job submitted with a `webhook_url` stores it and the events it subscribes to on its record
(`webhook_url`, `webhook_events` = ",succeeded,failed,"). The transition scripts of
service.jobs.store call LUA's `webhook(...)` when they make a change a webhook reports
(queued -> running: `started`; the terminal ones), in the same script as the change itself, so
a delivery is scheduled if and only if the transition happened, exactly once per (job, event):
the transitions are guarded (each happens once) and the outcome is created with HSETNX.

    undiffuse:job:{id}:webhooks   HASH   event -> JSON WebhookOutcome (the record's TTL, deleted with it)
    undiffuse:webhooks:due        ZSET   "{job id}:{event}" -> when its next attempt is due

A dispatcher (worker.dispatcher, one per Worker replica) `claim`s due entries: one
script moves each a lease ahead, so no other dispatcher sees it while it is being sent; `begin`
counts the attempt; `finish` writes the outcome and reschedules (RETRY_SCHEDULE) or removes the
entry, only if no later attempt began meanwhile. A dispatcher that dies mid-send leaves its entry
to come due again when the lease ends: the next attempt goes out then (at-least-once; receivers
deduplicate on the `webhook-id` header, which is the same for every attempt of one event).
"""

from __future__ import annotations

import random
from typing import Literal, get_args

import redis.asyncio as aioredis
from pydantic import BaseModel

from service.jobs import keys

WebhookEvent = Literal["started", "succeeded", "failed", "canceled"]
WEBHOOK_EVENTS: tuple[str, ...] = get_args(WebhookEvent)
DEFAULT_EVENTS: list[WebhookEvent] = ["succeeded", "failed", "canceled"]
EVENT_STATUS = {"started": "running", "succeeded": "succeeded", "failed": "failed", "canceled": "canceled"}

# Delay before retry n (after the n-th failed attempt), in units of Settings.webhook_retry_base_seconds.
# With the default 5 s: 5 s, 30 s, 2 min, 5 min, 15 min, 30 min, 1 h, 1 h, i.e. 9 attempts over
# about 2.9 h (2.3 h at the least with jitter); then the delivery is given up.
RETRY_SCHEDULE = (1, 6, 24, 60, 180, 360, 720, 720)
MAX_ATTEMPTS = len(RETRY_SCHEDULE) + 1
JITTER = 0.2  # each delay is scaled by a uniform factor in [1 - JITTER, 1 + JITTER]


def retry_delay(attempt: int, base_seconds: float, rng: random.Random | None = None) -> float | None:
    """Seconds to wait after failed attempt `attempt` (1-based) before the next one, with
    jitter; None when that was the last attempt."""
    if attempt < 1:
        raise ValueError(f"attempt counts from 1, got {attempt}")
    if attempt > len(RETRY_SCHEDULE):
        return None
    factor = (rng or random).uniform(1 - JITTER, 1 + JITTER)
    return RETRY_SCHEDULE[attempt - 1] * base_seconds * factor


def encode_events(events: list[str]) -> str:
    """The record's `webhook_events` field: ",a,b," (what the Lua matches ",event," in)."""
    return "," + ",".join(sorted(set(events))) + ","


def decode_events(field: str | None) -> list[str]:
    return [e for e in (field or "").split(",") if e]


def member(job_id: str, event: str) -> str:
    """A delivery's entry in keys.WEBHOOKS_DUE."""
    return f"{job_id}:{event}"


class WebhookOutcome(BaseModel):
    """One event's delivery, as stored (JSON) and shown on the job."""

    event: WebhookEvent
    status: Literal["pending", "delivered", "failed"]
    attempts: int = 0
    created_at: float  # when the event happened (the payload's timestamp)
    next_attempt_at: float | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    delivered_at: float | None = None


# Lua for the transition scripts: webhook(job, hooks, due, job_id, event, now) schedules the
# delivery of `event` now if the job subscribes to it and it was never scheduled.
LUA = """
local function webhook(job, hooks, due, job_id, kind, now)
  local subs = redis.call('HGET', job, 'webhook_events')
  if not subs or not string.find(subs, ',' .. kind .. ',', 1, true) then return end
  local initial = string.format(
    '{"event": "%s", "status": "pending", "attempts": 0, "created_at": %s, "next_attempt_at": %s}', kind, now, now)
  if redis.call('HSETNX', hooks, kind, initial) == 1 then
    local ttl = redis.call('PTTL', job)
    if ttl > 0 then redis.call('PEXPIRE', hooks, ttl) end
    redis.call('ZADD', due, 'NX', now, job_id .. ':' .. kind)
  end
end
"""

# KEYS[1] due; ARGV now, lease end, count. Takes up to count due entries and moves each to the
# lease end, atomically: two dispatchers never get the same entry at once.
_CLAIM = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do redis.call('ZADD', KEYS[1], ARGV[2], m) end
return due
"""

# KEYS[1] hooks; ARGV event. Counts an attempt of a pending delivery; returns its outcome JSON,
# or false when there is none to send (the job is gone, or the delivery already ended).
_BEGIN = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if not raw then return false end
local o = cjson.decode(raw)
if o['status'] ~= 'pending' then return false end
o['attempts'] = tonumber(o['attempts']) + 1
local out = cjson.encode(o)
redis.call('HSET', KEYS[1], ARGV[1], out)
return out
"""

# KEYS[1] hooks, KEYS[2] due; ARGV member, event, attempt, outcome JSON, next due ('' to end).
# Writes the attempt's outcome unless another attempt began since (a lease that ran out).
_FINISH = """
local raw = redis.call('HGET', KEYS[1], ARGV[2])
if not raw then redis.call('ZREM', KEYS[2], ARGV[1]) return 0 end
if tonumber(cjson.decode(raw)['attempts']) ~= tonumber(ARGV[3]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], ARGV[4])
if ARGV[5] == '' then redis.call('ZREM', KEYS[2], ARGV[1]) else redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1]) end
return 1
"""


class WebhookSchedule:
    """The schedule's operations on one Redis client (the store's)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._claim = client.register_script(_CLAIM)
        self._begin = client.register_script(_BEGIN)
        self._finish = client.register_script(_FINISH)

    async def claim(self, now: float, lease_s: float, count: int) -> list[tuple[str, str]]:
        """Up to count due deliveries as (job id, event), each leased for lease_s."""
        due = await self._claim(keys=[keys.WEBHOOKS_DUE], args=[repr(now), repr(now + lease_s), count])
        return [tuple(m.rsplit(":", 1)) for m in due]  # type: ignore[misc]

    async def next_due(self) -> float | None:
        """When the earliest entry is due (None: nothing scheduled)."""
        first = await self.r.zrange(keys.WEBHOOKS_DUE, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def begin(self, job_id: str, event: str) -> WebhookOutcome | None:
        """Count an attempt; its outcome so far (attempts includes this one), or None when
        there is nothing to send (then `drop` it)."""
        raw = await self._begin(keys=[keys.job_webhooks(job_id)], args=[event])
        return WebhookOutcome.model_validate_json(raw) if raw else None

    async def finish(self, job_id: str, outcome: WebhookOutcome) -> bool:
        """Store the outcome of attempt outcome.attempts: pending with next_attempt_at (retry
        then), or delivered / failed (the entry leaves the schedule). False if a later attempt
        had begun (this one's lease ran out)."""
        next_due = repr(outcome.next_attempt_at) if outcome.status == "pending" and outcome.next_attempt_at else ""
        return bool(
            await self._finish(
                keys=[keys.job_webhooks(job_id), keys.WEBHOOKS_DUE],
                args=[
                    member(job_id, outcome.event),
                    outcome.event,
                    outcome.attempts,
                    outcome.model_dump_json(),
                    next_due,
                ],
            )
        )

    async def drop(self, job_id: str, event: str) -> None:
        await self.r.zrem(keys.WEBHOOKS_DUE, member(job_id, event))


def outcomes(raw: dict[str, str]) -> list[WebhookOutcome]:
    """The HASH's outcomes, in the order of WEBHOOK_EVENTS."""
    return [WebhookOutcome.model_validate_json(raw[e]) for e in WEBHOOK_EVENTS if e in raw]
