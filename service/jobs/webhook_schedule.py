"""The durable webhook schedule: which deliveries are due, and each one's outcome, in Redis.

A job submitted with a `webhook_url` stores it and the events it subscribes to on its record
(`webhook_url`, `webhook_events` = ",succeeded,failed,"). The transition scripts of
service.jobs.store call LUA's `webhook(...)` when they make a change a webhook reports
(queued -> running: `started`; the terminal ones), in the same script as the change itself, so
a delivery is scheduled if and only if the transition happened, exactly once per (job, event):
the transitions are guarded (each happens once) and the outcome is created with HSETNX.

    undiffuse:job:{id}:webhooks          HASH   event -> JSON WebhookOutcome (the record's TTL, deleted with it)
    undiffuse:webhooks:due               ZSET   "{job id}:{event}" -> when its next attempt is due
    undiffuse:webhooks:parked            ZSET   owner -> when its earliest parked delivery came due
    undiffuse:webhooks:parked:{owner}    ZSET   "{job id}:{event}" -> when it came due (parked)

A dispatcher (worker.dispatcher, one per Worker replica) `claim`s due entries: one
script moves each a lease ahead, so no other dispatcher sees it while it is being sent; `begin`
counts the attempt; `finish` writes the outcome and reschedules (RETRY_SCHEDULE) or removes the
entry, only if no later attempt began meanwhile. A dispatcher that dies mid-send leaves its entry
to come due again when the lease ends: the next attempt goes out then (at-least-once; receivers
deduplicate on the `webhook-id` header, which is the same for every attempt of one event).

Claims are fair per owner: the caller says how many deliveries each owner has in flight with it,
and a due delivery whose owner already has `per_owner` is *parked* (moved, once, to its owner's
parked set) instead of being claimed, so it does not stand in front of other owners' deliveries
in the due set. An owner with room again gets its parked deliveries first, oldest first, from
any dispatcher. So one owner's backlog (receivers that never answer, thousands of retries due)
costs each claim O(what it moves), never a scan of that backlog, and delays nobody else's
deliveries. A parked delivery of a job deleted meanwhile is dropped when it is claimed (`begin`
finds no outcome), without a request.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from typing import Literal, NamedTuple, get_args

import redis.asyncio as aioredis
from pydantic import BaseModel

from service.jobs import redis_keys
from service.jobs.scripts import Script

# The schedule's per-owner keys (see the module docstring).
WEBHOOKS_PARKED = redis_keys.WEBHOOKS_PARKED
WEBHOOKS_PARKED_PREFIX = redis_keys.WEBHOOKS_PARKED_PREFIX
SCAN = 1000  # due entries one claim looks at, at most: the next claim goes on (Claim.more)

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

# due: the due set; parked: the parked owners; budget: the scan budget; in_flight: the
# caller's (owner, deliveries in flight) pairs, flattened. Takes up to count due entries, parked
# ones first, and moves each to lease_end, atomically: two dispatchers never get the same entry
# at once. An owner with per_owner deliveries in flight (counting those taken here) gets no
# more: its due entries are parked instead. Returns {{member, owner, ...}, 1 if the scan budget
# ran out}. A member whose job is gone has owner '' (no limit: the dispatcher drops it without
# sending).
_CLAIM = Script(
    f"local JOB_PREFIX, PARKED_PREFIX = {json.dumps(redis_keys.job(''))}, {json.dumps(WEBHOOKS_PARKED_PREFIX)}\n"
    + """
count, per_owner, budget = tonumber(count), tonumber(per_owner), tonumber(budget)
local busy, callers_owners = {}, 0
for i = 1, #in_flight - 1, 2 do
  busy[in_flight[i]] = tonumber(in_flight[i + 1])
  callers_owners = callers_owners + 1
end
local out, taken = {}, 0
local function room(owner) return owner == '' or (busy[owner] or 0) < per_owner end
local function take(m, owner)
  redis.call('ZADD', due, lease_end, m)
  busy[owner] = (busy[owner] or 0) + 1
  taken = taken + 1
  out[#out + 1] = m
  out[#out + 1] = owner
end
-- 1. parked entries: each came due before anything of its owner's still in the due set. Owners
-- without room here are skipped; at most callers_owners of them, so count more owners are seen.
if count > 0 then
  for _, owner in ipairs(redis.call('ZRANGEBYSCORE', parked, '-inf', now, 'LIMIT', 0, count + callers_owners)) do
    local want = math.min(per_owner - (busy[owner] or 0), count - taken)
    if want > 0 then
      local owners_parked = PARKED_PREFIX .. owner
      for _, m in ipairs(redis.call('ZRANGEBYSCORE', owners_parked, '-inf', now, 'LIMIT', 0, want)) do
        redis.call('ZREM', owners_parked, m)
        take(m, owner)
      end
      local first = redis.call('ZRANGE', owners_parked, 0, 0, 'WITHSCORES')
      if first[1] then redis.call('ZADD', parked, first[2], owner) else redis.call('ZREM', parked, owner) end
    end
  end
end
-- 2. the due set, earliest first: every entry looked at is taken or parked, so it leaves the
-- range and the next page starts at offset 0
local scanned = 0
while taken < count and scanned < budget do
  local page = redis.call('ZRANGEBYSCORE', due, '-inf', now, 'WITHSCORES', 'LIMIT', 0, math.min(64, budget - scanned))
  if #page == 0 then break end
  for i = 1, #page, 2 do
    if taken >= count then break end
    local m, at = page[i], page[i + 1]
    scanned = scanned + 1
    local owner = redis.call('HGET', JOB_PREFIX .. string.match(m, '^(.*):[^:]*$'), 'owner') or ''
    if room(owner) then
      take(m, owner)
    else
      redis.call('ZREM', due, m)
      redis.call('ZADD', PARKED_PREFIX .. owner, at, m)
      local since = redis.call('ZSCORE', parked, owner)
      if not since or tonumber(since) > tonumber(at) then redis.call('ZADD', parked, at, owner) end
    end
  end
end
return {out, scanned >= budget and 1 or 0}
""",
    keys=["due", "parked"],
    args=["now", "lease_end", "count", "per_owner", "budget", "*in_flight"],
)

# hooks: the job's outcomes. Counts an attempt of a pending delivery; returns its outcome JSON,
# or false when there is none to send (the job is gone, or the delivery already ended).
_BEGIN = Script(
    """
local raw = redis.call('HGET', hooks, event)
if not raw then return false end
local o = cjson.decode(raw)
if o['status'] ~= 'pending' then return false end
o['attempts'] = tonumber(o['attempts']) + 1
local out = cjson.encode(o)
redis.call('HSET', hooks, event, out)
return out
""",
    keys=["hooks"],
    args=["event"],
)

# hooks: the job's outcomes; due: the due set; member: the delivery's entry in it; next_due: ''
# to end. Writes the attempt's outcome unless another attempt began since (a lease that ran out).
_FINISH = Script(
    """
local raw = redis.call('HGET', hooks, event)
if not raw then redis.call('ZREM', due, member) return 0 end
if tonumber(cjson.decode(raw)['attempts']) ~= tonumber(attempt) then return 0 end
redis.call('HSET', hooks, event, outcome)
if next_due == '' then redis.call('ZREM', due, member) else redis.call('ZADD', due, next_due, member) end
return 1
""",
    keys=["hooks", "due"],
    args=["member", "event", "attempt", "outcome", "next_due"],
)


class Delivery(NamedTuple):
    job_id: str
    event: str
    owner: str  # the job's owner; "" when the job is gone (nothing to send)


class Claim(NamedTuple):
    deliveries: list[Delivery]
    more: bool  # the scan budget ran out: more may be due than this claim looked at


class WebhookSchedule:
    """The schedule's operations on one Redis client (the store's)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._claim = _CLAIM.register(client)
        self._begin = _BEGIN.register(client)
        self._finish = _FINISH.register(client)

    async def claim(
        self,
        now: float,
        lease_s: float,
        count: int,
        per_owner: int | None = None,
        in_flight: Mapping[str, int] | None = None,
        scan: int = SCAN,
    ) -> Claim:
        """Up to count due deliveries, each leased for lease_s; at most per_owner (None: no
        limit) in flight per owner, counting the caller's in_flight {owner: deliveries}."""
        pairs = [v for owner, n in (in_flight or {}).items() if n > 0 for v in (owner, n)]
        limit = count if per_owner is None else per_owner
        raw, more = await self._claim(
            due=redis_keys.WEBHOOKS_DUE,
            parked=WEBHOOKS_PARKED,
            now=repr(now),
            lease_end=repr(now + lease_s),
            count=count,
            per_owner=limit,
            budget=scan,
            in_flight=pairs,
        )
        deliveries = [Delivery(*raw[i].rsplit(":", 1), raw[i + 1]) for i in range(0, len(raw), 2)]
        return Claim(deliveries, bool(more))

    async def next_due(self) -> float | None:
        """When the earliest entry of the due set is due (None: nothing scheduled). Parked
        entries are due already, and wait for their owner to have room."""
        first = await self.r.zrange(redis_keys.WEBHOOKS_DUE, 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    async def begin(self, job_id: str, event: str) -> WebhookOutcome | None:
        """Count an attempt; its outcome so far (attempts includes this one), or None when
        there is nothing to send (then `drop` it)."""
        raw = await self._begin(hooks=redis_keys.job_webhooks(job_id), event=event)
        return WebhookOutcome.model_validate_json(raw) if raw else None

    async def finish(self, job_id: str, outcome: WebhookOutcome) -> bool:
        """Store the outcome of attempt outcome.attempts: pending with next_attempt_at (retry
        then), or delivered / failed (the entry leaves the schedule). False if a later attempt
        had begun (this one's lease ran out)."""
        next_due = repr(outcome.next_attempt_at) if outcome.status == "pending" and outcome.next_attempt_at else ""
        return bool(
            await self._finish(
                hooks=redis_keys.job_webhooks(job_id),
                due=redis_keys.WEBHOOKS_DUE,
                member=member(job_id, outcome.event),
                event=outcome.event,
                attempt=outcome.attempts,
                outcome=outcome.model_dump_json(),
                next_due=next_due,
            )
        )

    async def drop(self, job_id: str, event: str) -> None:
        await self.r.zrem(redis_keys.WEBHOOKS_DUE, member(job_id, event))


def outcomes(raw: dict[str, str]) -> list[WebhookOutcome]:
    """The HASH's outcomes, in the order of WEBHOOK_EVENTS."""
    return [WebhookOutcome.model_validate_json(raw[e]) for e in WEBHOOK_EVENTS if e in raw]
