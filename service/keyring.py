"""API keys added and revoked while the service runs, kept in Redis.

Configuration (`UNDIFFUSE_API_KEYS`, service.api_keys) holds the keys a deployment starts with, and
changing it takes a redeploy. The key ring holds the keys added since and every revocation, of a
key added here or of a configured one, so a leaked key is shut out at once. Like configuration,
Redis holds only SHA-256 digests, never a usable key:

    undiffuse:apikeys           HASH    digest -> {"owner", "created_at"}  (kept after a revocation)
    undiffuse:apikeys:revoked   HASH    digest -> {"owner", "revoked_at"}
    undiffuse:apikeys:version   STRING  bumped in the same MULTI/EXEC as every change

Each ingress replica keeps a copy (KeyRing) and checks the version at most once every
REFRESH_SECONDS (one GET), reading the two hashes only when it moved: a request costs no Redis
round trip of its own, and a key added or revoked here is accepted or refused by every replica
within REFRESH_SECONDS. A change made to the hashes by hand, without the version, is picked up
within RELOAD_SECONDS.

    python -m service.keyring add alice        # prints a new key; stores its digest for alice
    python -m service.keyring list             # owner, digest prefix, source, created, revoked
    python -m service.keyring revoke 9f86d081  # a digest, or a prefix of one (8+ hex digits)

The command takes the Redis URL (and the configured keys, which `list` shows and `revoke` can
revoke) from the service's configuration (service.settings); `--redis-url` overrides the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import re
import secrets
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError

from service.api_keys import OWNER, digest
from service.jobs import redis_keys
from service.jobs.connection import sync_redis
from service.settings import Settings

KEYS = redis_keys.API_KEYS
REVOKED = redis_keys.API_KEYS_REVOKED
VERSION = redis_keys.API_KEYS_VERSION

REFRESH_SECONDS = 1.0
"""How stale a replica's copy may be: a revocation takes effect within this time."""
RELOAD_SECONDS = 60.0
SHOWN_DIGEST = 12  # hex digits of a digest that `list` shows
MIN_PREFIX = 8  # hex digits `revoke` needs: a shorter prefix too easily names a key by mistake
HEX = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True)
class Snapshot:
    """The key ring as one replica last read it."""

    owners: dict[str, str]  # digest -> owner of every key added here, revoked ones too
    revoked: frozenset[str]  # digests of revoked keys, configured ones included
    version: str | None

    @property
    def empty(self) -> bool:
        """Nothing was ever added or revoked. A ring with only revoked keys is not empty: a
        revocation must never turn authentication off."""
        return not self.owners and not self.revoked


async def load(client: aioredis.Redis) -> Snapshot:
    async with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(KEYS).hkeys(REVOKED).get(VERSION)
        added, revoked, version = await pipe.execute()
    return Snapshot({d: json.loads(v)["owner"] for d, v in added.items()}, frozenset(revoked), version)


class KeyRing:
    """One ingress replica's copy of the key ring, checked at most every `refresh_seconds`.
    Redis errors propagate (the API answers 503): an unreadable ring never lets a request in."""

    def __init__(
        self,
        client: aioredis.Redis,
        refresh_seconds: float = REFRESH_SECONDS,
        reload_seconds: float = RELOAD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.r = client
        self.refresh_seconds = refresh_seconds
        self.reload_seconds = reload_seconds
        self.clock = clock
        self._snapshot: Snapshot | None = None
        self._checked_at = self._loaded_at = -math.inf
        self._lock = asyncio.Lock()  # one check at a time: a burst of requests waits for it, not beside it

    def _fresh(self) -> Snapshot | None:
        if self._snapshot is not None and self.clock() - self._checked_at < self.refresh_seconds:
            return self._snapshot
        return None

    async def snapshot(self) -> Snapshot:
        if (fresh := self._fresh()) is not None:
            return fresh
        async with self._lock:
            if (fresh := self._fresh()) is not None:
                return fresh
            started = self.clock()  # the copy is as old as the read's start
            cached = self._snapshot
            if cached is None or started - self._loaded_at >= self.reload_seconds:
                cached = await self._reload(started)
            elif await self.r.get(VERSION) != cached.version:
                cached = await self._reload(started)
            self._snapshot, self._checked_at = cached, started
            return cached

    async def _reload(self, started: float) -> Snapshot:
        snapshot = await load(self.r)
        self._loaded_at = started
        return snapshot


# --- the command's operations (a synchronous client) ------------------------------------------


@dataclass(frozen=True)
class Entry:
    digest: str
    owner: str
    source: str  # "redis" (added with `add`) or "config" (UNDIFFUSE_API_KEYS)
    created_at: float | None
    revoked_at: float | None


def add(client: redis.Redis, owner: str, now: float | None = None) -> tuple[str, str]:
    """A new key for `owner`, stored as its digest: (the key, its digest). The key is shown
    once, by the caller, and kept nowhere."""
    if not OWNER.fullmatch(owner):
        raise ValueError(f"owner must match {OWNER.pattern}")
    key = "ud_" + secrets.token_urlsafe(32)
    key_digest = digest(key)
    record = json.dumps({"owner": owner, "created_at": time.time() if now is None else now})
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(KEYS, key_digest, record).incr(VERSION)
        pipe.execute()
    return key, key_digest


def revoke(client: redis.Redis, key_digest: str, owner: str, now: float | None = None) -> bool:
    """Refuse the key of this digest from now on. False if it was already revoked."""
    record = json.dumps({"owner": owner, "revoked_at": time.time() if now is None else now})
    with client.pipeline(transaction=True) as pipe:
        pipe.hsetnx(REVOKED, key_digest, record).incr(VERSION)
        created, _ = pipe.execute()
    return bool(created)


def entries(client: redis.Redis, configured: dict[str, str]) -> list[Entry]:
    """Every key known to configuration or the ring, revoked ones included, oldest first."""
    with client.pipeline(transaction=True) as pipe:
        pipe.hgetall(KEYS).hgetall(REVOKED)
        added, revoked = pipe.execute()
    revoked = {d: json.loads(v) for d, v in revoked.items()}
    found = {d: Entry(d, o, "config", None, None) for d, o in configured.items()}
    for d, value in added.items():
        record = json.loads(value)
        found[d] = Entry(d, record["owner"], "redis", record["created_at"], None)
    for d, record in revoked.items():
        known = found.get(d) or Entry(d, record["owner"], "unknown", None, None)
        found[d] = Entry(d, known.owner, known.source, known.created_at, record["revoked_at"])
    return sorted(found.values(), key=lambda e: (e.created_at or 0.0, e.owner, e.digest))


def resolve(prefix: str, known: list[Entry]) -> str:
    """The one digest among `known` that starts with `prefix`; a full digest stands for itself
    (a configured key can be revoked by its hash where the command does not see the
    configuration). ValueError names what is wrong."""
    prefix = prefix.strip().lower().removeprefix("sha256:")
    if not HEX.fullmatch(prefix) or not MIN_PREFIX <= len(prefix) <= 64:
        raise ValueError(f"give a key's digest or at least {MIN_PREFIX} hex digits of it (`list` shows them)")
    matches = sorted({e.digest for e in known if e.digest.startswith(prefix)})
    if len(prefix) == 64 and not matches:
        return prefix
    if not matches:
        raise ValueError(f"no key's digest starts with {prefix}")
    if len(matches) > 1:
        raise ValueError(f"{len(matches)} keys' digests start with {prefix}: give more digits")
    return matches[0]


def _when(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m service.keyring",
        description="API keys added and revoked at run time (in Redis); every Ingress replica sees a change "
        f"within {REFRESH_SECONDS:g} s.",
    )
    p.add_argument("--redis-url", help="default: the service's configuration (UNDIFFUSE_REDIS_URL)")
    sub = p.add_subparsers(dest="command", required=True)
    add_p = sub.add_parser("add", help="print a new key for OWNER; Redis keeps only its digest")
    add_p.add_argument(
        "owner", help="owner id: letters, digits, _ . - (the same id as a configured key's shares its jobs)"
    )
    revoke_p = sub.add_parser("revoke", help="refuse a key, added here or configured, from now on")
    revoke_p.add_argument("digest", help=f"the key's digest, or a prefix of it ({MIN_PREFIX}+ hex digits)")
    sub.add_parser("list", help="every key: digest prefix, owner, source, created, revoked (never the key)")
    args = p.parse_args(argv)
    try:
        settings = Settings()
    except ValidationError as e:
        p.error(f"the service's configuration is invalid: {e}")
    client = sync_redis(args.redis_url or settings.redis_url, settings.redis_timeout_seconds)
    try:
        return _run(p, args, client, settings.key_owners)
    finally:
        client.close()


def _run(p: argparse.ArgumentParser, args: argparse.Namespace, client: redis.Redis, configured: dict[str, str]) -> int:
    if args.command == "add":
        try:
            key, key_digest = add(client, args.owner)
        except ValueError as e:
            p.error(str(e))
        print(f"key:    {key}\ndigest: {key_digest[:SHOWN_DIGEST]} (owner {args.owner})")
        return 0
    known = entries(client, configured)
    if args.command == "list":
        print(f"{'digest':<{SHOWN_DIGEST}}  {'owner':<24}  {'source':<7}  {'created':<20}  revoked")
        for e in known:
            print(
                f"{e.digest[:SHOWN_DIGEST]}  {e.owner:<24}  {e.source:<7}  {_when(e.created_at):<20}  {_when(e.revoked_at)}"
            )
        return 0
    try:
        key_digest = resolve(args.digest, known)
    except ValueError as e:
        p.error(str(e))
    owner = next((e.owner for e in known if e.digest == key_digest), "-")
    if revoke(client, key_digest, owner):
        print(f"revoked {key_digest[:SHOWN_DIGEST]} (owner {owner}): refused everywhere within {REFRESH_SECONDS:g} s")
    else:
        print(f"{key_digest[:SHOWN_DIGEST]} (owner {owner}) was already revoked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
