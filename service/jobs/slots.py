"""Per-owner slots for long responses (event streams, archive downloads), counted in Redis so
every Ingress replica sees the same count.

A slot is a member of the owner's ZSET (service.jobs.redis_keys.owner_slots) scored by its lease's
end. One script drops lapsed leases, checks the count and adds the new one, so concurrent
requests on any number of replicas can never hold more than the limit (a count kept per replica,
checked in the handler and incremented later when the response starts, let 33 of 40 concurrent
streams through a limit of 16). A response renews its lease while it flows and releases it when
it ends; a replica that dies mid-response leaves a lease that lapses within LEASE_SECONDS.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.jobs import redis_keys
from service.jobs.scripts import Script

log = logging.getLogger("ray.serve")
LEASE_SECONDS = 30.0
RENEW_SECONDS = 10.0  # a flowing response renews its lease this often, well within its lifetime

# slots: the owner's. Redis's clock, so replicas' clocks do not matter. Returns 1 if the slot
# was taken, 0 when the owner holds `limit` already.
_ACQUIRE = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', slots, '-inf', now)
if redis.call('ZCARD', slots) >= tonumber(limit) then return 0 end
redis.call('ZADD', slots, now + tonumber(lease_ms), token)
redis.call('PEXPIRE', slots, lease_ms)
return 1
""",
    keys=["slots"],
    args=["lease_ms", "limit", "token"],
)

# slots: the owner's. Returns 1 while the lease is held (0: it lapsed, and the slot may have
# gone to another response).
_RENEW = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local until_ms = redis.call('ZSCORE', slots, token)
if not until_ms or tonumber(until_ms) < now then return 0 end
redis.call('ZADD', slots, now + tonumber(lease_ms), token)
if redis.call('PTTL', slots) < tonumber(lease_ms) then redis.call('PEXPIRE', slots, lease_ms) end
return 1
""",
    keys=["slots"],
    args=["lease_ms", "token"],
)


class OwnerSlots:
    """At most `limit` leases per owner at a time, across every process on this Redis."""

    def __init__(self, client: aioredis.Redis, limit: int, lease_seconds: float = LEASE_SECONDS) -> None:
        self.r = client
        self.limit = limit
        self.lease_ms = int(lease_seconds * 1000)
        self._acquire = _ACQUIRE.register(client)
        self._renew = _RENEW.register(client)

    async def acquire(self, owner: str) -> Lease | None:
        """A lease on one of the owner's slots, or None when it holds `limit` already."""
        token = secrets.token_hex(8)
        taken = await self._acquire(
            slots=redis_keys.owner_slots(owner), lease_ms=self.lease_ms, limit=self.limit, token=token
        )
        return Lease(self, owner, token) if taken else None

    async def renew(self, owner: str, token: str) -> bool:
        """Extend the lease; False if it had lapsed (the response should end)."""
        return bool(await self._renew(slots=redis_keys.owner_slots(owner), lease_ms=self.lease_ms, token=token))

    async def release(self, owner: str, token: str) -> None:
        await self.r.zrem(redis_keys.owner_slots(owner), token)

    async def held(self, owner: str) -> int:
        """Leases the owner holds now, lapsed ones not yet dropped included."""
        return int(await self.r.zcard(redis_keys.owner_slots(owner)))


class Lease:
    """One held slot, renewed every RENEW_SECONDS by a task of its own for as long as it is held
    (a response's slow sends or slow reads cannot let it lapse); `release()` when the response
    ends. `keep()` says whether it still holds: False once a renewal found it lapsed (Redis was
    away longer than the lease), and the response should end."""

    def __init__(self, slots: OwnerSlots, owner: str, token: str) -> None:
        self.slots, self.owner, self.token = slots, owner, token
        self.held = True
        self._renewing = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        while self.held:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                self.held = await self.slots.renew(self.owner, self.token)
            except RedisError as e:  # tried again next time; the lease has LEASE_SECONDS in all
                log.warning("a response slot of %s was not renewed: %s", self.owner, e)

    async def keep(self) -> bool:
        return self.held

    async def release(self) -> None:
        """Give the slot back (repeating it is harmless), also from a response being cancelled
        (a client that went away must not keep its slot until the lease lapses); a Redis error
        leaves it to lapse."""
        self.held = False
        self._renewing.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await self.slots.release(self.owner, self.token)
            except RedisError as e:
                log.warning("a response slot of %s was not released (%s); it lapses by itself", self.owner, e)
