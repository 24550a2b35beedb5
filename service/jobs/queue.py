"""The shard queue: fair across owners, admitted by capacity. Nothing else touches its keys.

Shards wait in one FIFO list per owner (service.jobs.redis_keys.owner_shards). A Worker *admits*
shards with one Lua script (`admit`) that takes owners in deficit-round-robin order, weighted
by cost (images x steps, x2 with guidance: the rows the Denoiser runs for it), so every owner
with work waiting gets its share of the Denoiser whatever another owner has queued:

- each visit to an owner adds a quantum (the largest shard's cost) to its deficit, and its
  head shards are admitted while they fit the deficit: over many rounds every backlogged owner
  is served the same cost (Shreedhar and Varghese, 1996). With a quantum of at least the
  largest shard, every visit that may admit does, so a call costs O(shards admitted + owners
  skipped), never O(backlog);
- an owner whose list was empty and who holds nothing in flight joins at the *head* of the
  round (as FQ-CoDel's new flows do): a newcomer is admitted by the next call;
- the rows admitted follow the capacity the caller passes: `window` rows in flight across the
  deployment (about twice the Denoiser replicas' batches, service.jobs.capacity), and each
  owner at most its share of it (window / owners with work waiting) while others wait. Rows in
  flight, not shard counts, are what the engine runs, so that is what the window counts;
- every job starts at once: an owner's first shard in flight always goes in, past a full
  window (one per owner, so bounded by the owners), and a job's first shard may go past it up
  to halfway from the window to `hard` (and twice the owner's share); so a small job is not
  held behind a big one, its owner's or another's: in the engine, its rows join the next step
  and the engine's least-remaining-work rule runs them first.

Delivery is at-least-once, as a lease: an admitted shard is a Message whose id is a lease
token ("shard id:delivery:consumer"). The Worker heart-beats it (the lease's deadline moves a visibility timeout ahead) and
settles it exactly one way: ack, requeue as its next attempt, put back (no attempt spent), or
dead-letter. Settling with a token that is no longer the shard's lease (its lease expired and
another Worker reclaimed it) does nothing, so a shard is settled once per delivery. A shard
whose lease expired is taken over by `reclaim`. Put-back shards go to the head of their owner's
list: a retry is not sent behind the owner's newer work. Every change is one script, so a
Redis crash (AOF, fsync every second) leaves the queue in a state some script left it.

Counters kept beside the lists make the queue's numbers O(1) to read: shards and cost waiting
and in flight (`totals`), each owner's waiting cost, and per owner the cost ever enqueued and
admitted, from which a queued job's position is read (`position`).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from service.jobs import redis_keys
from service.jobs.records import ShardTask
from service.jobs.scripts import Script

DEAD_LETTER_MAXLEN = 10_000
WAKE_MAXLEN = 16  # submissions not yet noticed by a waiting Worker: one wake-up is enough
MAX_VISITS = 512  # owners one admit call looks at, at most: the round goes on at the next call

# The keys every script uses; owner keys are built from keys.QUEUE_OWNER_PREFIX in the script.
_KEYS = {
    "ACTIVE": redis_keys.QUEUE_ACTIVE,
    "WAITING": redis_keys.QUEUE_WAITING_COST,
    "TOTALS": redis_keys.QUEUE_TOTALS,
    "MSG": redis_keys.QUEUE_MESSAGES,
    "META": redis_keys.QUEUE_META,
    "LEASES": redis_keys.QUEUE_LEASES,
    "LESSEE": redis_keys.QUEUE_LESSEES,
    "SEQ": redis_keys.QUEUE_SEQ,
    "WAKE": redis_keys.QUEUE_WAKE,
    "DEAD": redis_keys.DEAD_LETTER_STREAM,
}

_PRELUDE = "".join(f"local {name} = {json.dumps(key)}\n" for name, key in _KEYS.items()) + (
    f"local OWNER_PREFIX = {json.dumps(redis_keys.QUEUE_OWNER_PREFIX)}\n"
    f"local WAKE_LAST, DEAD_MAXLEN = {WAKE_MAXLEN - 1}, {DEAD_LETTER_MAXLEN}\n"
    f"local REPLY_PREFIX = {json.dumps(redis_keys.QUEUE_REPLY_PREFIX)}\n"
    + """
local function stats_key(owner) return OWNER_PREFIX .. owner end
local function list_key(owner) return OWNER_PREFIX .. owner .. ':shards' end
local function meta(id)  -- {owner, cost, rows, 1 if its job's first shard} of a shard
  local raw = redis.call('HGET', META, id)
  if not raw then return nil end
  return cjson.decode(raw)
end
local function num(v) return tonumber(v) or 0 end
-- a leased shard goes back to waiting, at the head of its owner's list
local function unlease(id, m)
  redis.call('ZREM', LEASES, id)
  redis.call('HDEL', LESSEE, id)
  redis.call('HINCRBY', stats_key(m[1]), 'held', -m[3])
  redis.call('HINCRBY', TOTALS, 'inflight', -1)
  redis.call('HINCRBY', TOTALS, 'inflight_rows', -m[3])
  redis.call('HINCRBY', TOTALS, 'inflight_cost', -m[2])
end
local function wait_again(id, m)
  local owner = m[1]
  if redis.call('LPUSH', list_key(owner), id) == 1 then redis.call('RPUSH', ACTIVE, owner) end
  redis.call('HINCRBY', WAITING, owner, m[2])
  redis.call('HINCRBY', stats_key(owner), 'admitted', -m[2])
  redis.call('HINCRBY', TOTALS, 'waiting', 1)
  redis.call('HINCRBY', TOTALS, 'waiting_cost', m[2])
end
local function forget(id, m)  -- settled for good
  redis.call('HDEL', MSG, id)
  redis.call('HDEL', META, id)
  if redis.call('HINCRBY', stats_key(m[1]), 'shards', -1) <= 0 then
    redis.call('DEL', stats_key(m[1]))  -- nothing of this owner's waits or runs
    redis.call('HDEL', WAITING, m[1])
    redis.call('HINCRBY', TOTALS, 'owners', -1)
  end
end
-- the shard id of a lease token ('id:n'), if that token is still the shard's lease
local function leased(token)
  local id = string.match(token, '^(%d+):')
  if id and redis.call('HGET', LESSEE, id) == token then return id end
  return nil
end
-- A consumer's last reply by request nonce, kept a minute: a client that retries a call whose
-- reply was lost gets the same leases back instead of leaving them to expire.
local function replay(consumer, nonce)
  local raw = redis.call('GET', REPLY_PREFIX .. consumer)
  if not raw then return nil end
  local kept = cjson.decode(raw)
  if kept[1] == nonce then return kept[2] end
  return nil
end
local function remember(consumer, nonce, out)
  if #out > 0 then redis.call('SET', REPLY_PREFIX .. consumer, cjson.encode({nonce, out}), 'EX', 60) end
end
local function lease(id, deadline, consumer)
  local token = id .. ':' .. redis.call('INCR', SEQ) .. ':' .. consumer
  redis.call('ZADD', LEASES, deadline, id)
  redis.call('HSET', LESSEE, id, token)
  return token
end
"""
)

# job: the job's record (its queue_mark is set); shards: (cost, rows, 1 for the job's first
# shard else 0, task JSON) per shard, flattened. Returns the owner's cost enqueued before these
# shards (-1: the job was queued already, or has no shards).
_ENQUEUE = Script(
    _PRELUDE
    + """
local sk, lk = stats_key(owner), list_key(owner)
-- a transaction resent after a lost reply runs again: the job's shards are queued once
if #shards < 4 or redis.call('HEXISTS', job, 'queue_mark') == 1 then return -1 end
local mark = num(redis.call('HGET', sk, 'enqueued'))
redis.call('HSET', job, 'queue_mark', mark)
local fresh = redis.call('LLEN', lk) == 0
local idle = num(redis.call('HGET', sk, 'held')) == 0
local n, cost = 0, 0
for i = 1, #shards, 4 do
  local id = tostring(redis.call('INCR', SEQ))
  redis.call('HSET', MSG, id, shards[i + 3])
  redis.call('HSET', META, id, cjson.encode({owner, tonumber(shards[i]), tonumber(shards[i + 1]), tonumber(shards[i + 2])}))
  redis.call('RPUSH', lk, id)
  n, cost = n + 1, cost + tonumber(shards[i])
end
if redis.call('HINCRBY', sk, 'shards', n) == n then redis.call('HINCRBY', TOTALS, 'owners', 1) end
redis.call('HINCRBY', sk, 'enqueued', cost)
redis.call('HINCRBY', WAITING, owner, cost)
redis.call('HINCRBY', TOTALS, 'waiting', n)
redis.call('HINCRBY', TOTALS, 'waiting_cost', cost)
if fresh then
  if idle then redis.call('LPUSH', ACTIVE, owner) else redis.call('RPUSH', ACTIVE, owner) end
end
redis.call('LPUSH', WAKE, 1)
redis.call('LTRIM', WAKE, 0, WAKE_LAST)
return mark
""",
    keys=["job"],
    args=["owner", "*shards"],
)

# deadline: the leases' end (ms); window, hard: rows; max_count: shards; max_visits: owners to
# visit. Returns a flat list of (lease token, task JSON); the same nonce again (a client retry
# after a lost reply) returns the same list instead of admitting more.
_ADMIT = Script(
    _PRELUDE
    + """
deadline, window, hard = tonumber(deadline), tonumber(window), tonumber(hard)
max_count, quantum, max_visits = tonumber(max_count), tonumber(quantum), tonumber(max_visits)
local replied = replay(consumer, nonce)
if replied then return replied end
local total = num(redis.call('HGET', TOTALS, 'inflight_rows'))
-- each owner's share of the window while others wait: owners with shards waiting share it
local share = window / math.max(1, redis.call('LLEN', ACTIVE))
local out, admitted = {}, 0
local visits = math.min(max_visits, redis.call('LLEN', ACTIVE))
for _ = 1, visits do
  if admitted >= max_count then break end
  local owner = redis.call('LPOP', ACTIVE)
  if not owner then break end
  local sk, lk = stats_key(owner), list_key(owner)
  local held = num(redis.call('HGET', sk, 'held'))
  local before = num(redis.call('HGET', sk, 'deficit'))
  local deficit = before
  if redis.call('HDEL', sk, 'resume') == 0 then deficit = deficit + quantum end  -- a new visit
  local served, cost_served, blocked = 0, 0, false
  while true do
    local id = redis.call('LINDEX', lk, 0)
    if not id then break end
    local m = meta(id)
    local cost, rows = m[2], m[3]
    if cost > deficit then break end
    if admitted >= max_count then blocked = 'count' break end
    -- within the window and the owner's share; or past a full window: an owner's first shard in
    -- flight, always (one per owner: a newcomer is never held behind others, even when the
    -- window has shrunk under what is in flight), or a job's first shard (up to twice the
    -- owner's share and halfway from the window to hard)
    local fits = (held + rows <= math.max(share, rows) and total + rows <= window)
      or held == 0
      or (m[4] == 1 and held + rows <= 2 * share and total + rows <= (window + hard) / 2)
    if not fits then blocked = 'capacity' break end
    redis.call('LPOP', lk)
    out[#out + 1] = lease(id, deadline, consumer)
    out[#out + 1] = redis.call('HGET', MSG, id)
    held, total, deficit = held + rows, total + rows, deficit - cost
    served, cost_served, admitted = served + 1, cost_served + cost, admitted + 1
  end
  redis.call('HSET', sk, 'held', held)
  redis.call('HINCRBY', sk, 'admitted', cost_served)
  redis.call('HINCRBY', WAITING, owner, -cost_served)
  redis.call('HINCRBY', TOTALS, 'waiting', -served)
  redis.call('HINCRBY', TOTALS, 'waiting_cost', -cost_served)
  redis.call('HINCRBY', TOTALS, 'inflight', served)
  redis.call('HINCRBY', TOTALS, 'inflight_cost', cost_served)
  if redis.call('LLEN', lk) == 0 then
    redis.call('HDEL', sk, 'deficit')  -- an owner that leaves the round keeps no credit
  elseif blocked == 'count' then
    -- the caller took all it asked for mid-visit: the visit goes on at the next call
    redis.call('HSET', sk, 'deficit', deficit, 'resume', 1)
    redis.call('LPUSH', ACTIVE, owner)
  else
    if blocked == 'capacity' then
      -- a visit that admitted nothing for lack of room earns nothing; one cut short keeps no
      -- more than a quantum (or its head's cost) of credit
      if served == 0 then deficit = before end
      deficit = math.min(deficit, math.max(quantum, meta(redis.call('LINDEX', lk, 0))[2]))
    end
    redis.call('HSET', sk, 'deficit', math.max(0, deficit))
    redis.call('RPUSH', ACTIVE, owner)
  end
  if blocked == 'count' then break end
end
redis.call('HSET', TOTALS, 'inflight_rows', total)
remember(consumer, nonce, out)
return out
""",
    args=["deadline", "window", "hard", "max_count", "quantum", "max_visits", "consumer", "nonce"],
)

# now_ms, deadline: ms; max_count: shards. Leases that expired are handed to the caller (new
# tokens), who settles them. Returns a flat list of (lease token, task JSON).
_RECLAIM = Script(
    _PRELUDE
    + """
local replied = replay(consumer, nonce)
if replied then return replied end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASES, '-inf', now_ms, 'LIMIT', 0, tonumber(max_count))) do
  out[#out + 1] = lease(id, tonumber(deadline), consumer)
  out[#out + 1] = redis.call('HGET', MSG, id) or ''
end
remember(consumer, nonce, out)
return out
""",
    args=["now_ms", "deadline", "max_count", "consumer", "nonce"],
)

# token: the lease; deadline: its new end (ms). Returns 1 if the lease is still the caller's.
_HEARTBEAT = Script(
    _PRELUDE
    + """
local id = leased(token)
if not id then return 0 end
redis.call('ZADD', LEASES, 'XX', tonumber(deadline), id)
return 1
""",
    args=["token", "deadline"],
)

# token: the lease; how: 'ack', 'wait' (payload: the new task JSON) or 'dead' (payload: the
# fields JSON, with a reason). Returns 1 if settled, 0 if the token is no longer the shard's lease.
_SETTLE = Script(
    _PRELUDE
    + """
local id = leased(token)
if not id then return 0 end
local m = meta(id)
unlease(id, m)
if how == 'wait' then
  redis.call('HSET', MSG, id, payload)
  wait_again(id, m)
  return 1
end
if how == 'dead' then
  local fields = cjson.decode(payload)
  local flat = {}
  for k, v in pairs(fields) do flat[#flat + 1] = k; flat[#flat + 1] = v end
  redis.call('XADD', DEAD, 'MAXLEN', '~', DEAD_MAXLEN, '*', 'reason', reason, unpack(flat))
end
forget(id, m)
return 1
""",
    args=["token", "how", "payload", "reason"],
)

# job: the job's record; owner: the job's; now: epoch s; rate: throughput (cost per second, 0 if
# unknown). Returns {cost ahead, estimated start (epoch s, or '')}, each no larger than what was
# answered before for this job (queue_ahead, queue_start_at), so a waiting job's position and
# ETA only ever count down.
_POSITION = Script(
    _PRELUDE
    + """
now, rate = tonumber(now), tonumber(rate)
local mark = tonumber(redis.call('HGET', job, 'queue_mark'))
if not mark then return {0, ''} end
local own = math.max(0, mark - num(redis.call('HGET', stats_key(owner), 'admitted')))
local ahead = own
local waiting = redis.call('HGETALL', WAITING)
for i = 1, #waiting, 2 do
  if waiting[i] ~= owner then ahead = ahead + math.min(math.max(0, tonumber(waiting[i + 1])), own) end
end
local before = tonumber(redis.call('HGET', job, 'queue_ahead'))
if before and before < ahead then ahead = before end
redis.call('HSET', job, 'queue_ahead', ahead)
local start = ''
if rate > 0 then
  start = now + ahead / rate
  local earlier = tonumber(redis.call('HGET', job, 'queue_start_at'))
  if earlier and earlier >= now and earlier < start then start = earlier end  -- a lapsed one is renewed
  redis.call('HSET', job, 'queue_start_at', tostring(start))
  start = tostring(start)
end
return {ahead, start}
""",
    keys=["job"],
    args=["owner", "now", "rate"],
)


def shard_cost(task: ShardTask) -> tuple[int, int]:
    """(cost, rows) of a shard: rows the Denoiser runs for it (twice its images with guidance:
    a null-class twin each) and cost = rows x steps, the unit of fairness, position and
    autoscaling (row-steps; what a replica's measured throughput counts)."""
    rows = task.count * (2 if task.params.guidance_scale != 1.0 else 1)
    return rows * task.params.steps, rows


@dataclass
class Message:
    """One delivery: its lease token, the raw fields, and the task (None if they do not parse)."""

    id: str
    fields: dict[str, str]
    task: ShardTask | None


@dataclass(frozen=True)
class Totals:
    """The queue's numbers, read in one round trip."""

    waiting: int  # shards waiting
    waiting_cost: int
    inflight: int  # shards admitted and not yet settled
    inflight_rows: int
    inflight_cost: int
    owners: int  # owners with shards waiting or in flight

    @property
    def shards(self) -> int:
        return self.waiting + self.inflight

    @property
    def cost(self) -> int:
        return self.waiting_cost + self.inflight_cost

    @classmethod
    def parse(cls, raw: dict) -> Totals:
        return cls(**{f: int(raw.get(f, 0)) for f in cls.__dataclass_fields__})


def parse_task(fields: dict[str, str]) -> ShardTask | None:
    try:
        return ShardTask.model_validate_json(fields["task"])
    except (KeyError, ValidationError):
        return None


def _messages(flat: list) -> list[Message]:
    out = []
    for token, raw in zip(flat[::2], flat[1::2], strict=True):
        fields = {"task": raw}
        out.append(Message(token, fields, parse_task(fields)))
    return out


def holders(client: redis.Redis) -> list[tuple[str, ShardTask | None]]:
    """(consumer, task) of every shard in flight, read with a synchronous client (for drills
    and tests: which Worker holds what)."""
    lessees = client.hgetall(redis_keys.QUEUE_LESSEES)
    tasks = client.hmget(redis_keys.QUEUE_MESSAGES, list(lessees)) if lessees else []
    return [
        (token.split(":", 2)[2], parse_task({"task": raw}) if raw else None)
        for token, raw in zip(lessees.values(), tasks, strict=True)
    ]


def totals(client: redis.Redis) -> Totals:
    """The queue's totals, read with a synchronous client (the autoscaling policy's)."""
    return Totals.parse(client.hgetall(redis_keys.QUEUE_TOTALS))


class ShardQueue:
    """The queue on one async Redis client. quantum: the deficit each owner earns per visit; at
    least the largest shard's cost (service.settings: shard_size x max_steps x 2), so that
    every visit to an owner with capacity admits."""

    def __init__(self, client: aioredis.Redis, quantum: int = 16 * 1000 * 2) -> None:
        self.r = client
        self.quantum = quantum
        self._enqueue = _ENQUEUE.register(client)
        self._admit = _ADMIT.register(client)
        self._reclaim = _RECLAIM.register(client)
        self._heartbeat = _HEARTBEAT.register(client)
        self._settle = _SETTLE.register(client)
        self._position = _POSITION.register(client)

    async def enqueue(self, pipe: aioredis.client.Pipeline, job_key: str, owner: str, tasks: list[ShardTask]) -> None:
        """Queue a job's shards in the caller's transaction (a pipeline after MULTI: this only
        buffers the script call), recording on the job's record where in its owner's order
        they stand (for `position`)."""
        shards: list = []
        for task in tasks:
            shards.extend([*shard_cost(task), int(task.shard == 0), task.model_dump_json()])
        await self._enqueue(job=job_key, owner=owner, shards=shards, client=pipe)

    async def read(
        self,
        consumer: str,
        deadline_ms: int,
        window: int,
        hard: int | None = None,
        count: int = 64,
        visits: int = MAX_VISITS,
    ) -> list[Message]:
        """Admit up to count shards in fair order while the rows in flight stay within window
        (hard, default 2 x window: a job's first shard may go halfway from window to hard, an
        owner's first shard in flight always goes in); each is leased to consumer until
        deadline_ms (epoch ms)."""
        hard = 2 * window if hard is None else hard
        nonce = uuid.uuid4().hex
        reply = await self._admit(
            deadline=deadline_ms,
            window=window,
            hard=hard,
            max_count=count,
            quantum=self.quantum,
            max_visits=visits,
            consumer=consumer,
            nonce=nonce,
        )
        return _messages(reply)

    async def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a submission since the last wake-up (or timeout_s); True if woken."""
        return await self.r.blpop([redis_keys.QUEUE_WAKE], timeout=timeout_s) is not None

    async def reclaim(self, consumer: str, now_ms: int, deadline_ms: int, count: int = 50) -> list[Message]:
        """Take over up to count shards whose lease expired (their Worker stopped heart-beating);
        the caller settles them (usually `put_back`)."""
        nonce = uuid.uuid4().hex
        reply = await self._reclaim(
            now_ms=now_ms, deadline=deadline_ms, max_count=count, consumer=consumer, nonce=nonce
        )
        return _messages(reply)

    async def heartbeat(self, message_id: str, deadline_ms: int) -> bool:
        """Move the lease's deadline; False if the lease is no longer this delivery's."""
        return bool(await self._heartbeat(token=message_id, deadline=deadline_ms))

    async def ack(self, message_id: str) -> bool:
        return bool(await self._settle(token=message_id, how="ack", payload="", reason=""))

    async def requeue(self, message_id: str, task: ShardTask) -> bool:
        """Put the shard back as its next attempt."""
        return await self.put_back(message_id, task.model_copy(update={"attempt": task.attempt + 1}))

    async def put_back(self, message_id: str, task: ShardTask) -> bool:
        """Put the shard back as it is given (no attempt spent), at the head of its owner's list."""
        return bool(await self._settle(token=message_id, how="wait", payload=task.model_dump_json(), reason=""))

    async def dead_letter(self, message_id: str, fields: dict[str, str], reason: str) -> bool:
        """Move a shard (out of attempts, or one that does not parse) to the dead-letter stream."""
        return bool(await self._settle(token=message_id, how="dead", payload=json.dumps(fields), reason=reason))

    async def totals(self) -> Totals:
        return Totals.parse(await self.r.hgetall(redis_keys.QUEUE_TOTALS))

    async def depth(self) -> int:
        """Shards waiting or in flight."""
        return (await self.totals()).shards

    async def position(self, job_key: str, owner: str, now: float, throughput: float) -> tuple[int, float | None]:
        """(cost that will be served before the job's first shard, estimated start as epoch
        seconds or None without a throughput). Under deficit round robin every other owner is
        served about as much as the job's own owner before it: the job's own owner's cost ahead
        of it, plus for each other owner the smaller of its waiting cost and that. Neither number
        ever grows for one job (each answer is kept on its record)."""
        ahead, start = await self._position(job=job_key, owner=owner, now=now, rate=throughput)
        return int(ahead), (float(start) if start not in ("", b"", None) else None)
