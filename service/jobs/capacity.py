"""What the Denoiser replicas can take, as they report it in Redis (keys.DENOISERS).

Each replica writes, every second, its batch (`max_batch`: rows per network call) and its
measured throughput (row-steps per second over its recent steps: the queue's cost unit). Readers
sum the fresh reports:

- the Workers size the queue's admission window from them: 2 x the replicas' batches, so each
  replica holds the rows of its next steps and no more (service.jobs.queue);
- the Ingress turns a queued job's cost ahead into an estimated start;
- the autoscaling policy asks for replicas from the backlog's cost and the per-replica throughput.

A report older than STALE_SECONDS is ignored (its replica stopped or is stuck), and one older
than FORGET_SECONDS is deleted by the next reader.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aioredis

from service.jobs import redis_keys

STALE_SECONDS = 10.0
FORGET_SECONDS = 300.0


@dataclass(frozen=True)
class Capacity:
    """The sum of the fresh reports."""

    replicas: int
    max_batch: int  # rows per network call, summed over replicas
    throughput: float  # row-steps per second, summed over replicas that measured one

    def window(self, fallback: int) -> int:
        """Rows the queue lets in flight: twice the replicas' batches (fallback before any
        replica reported, e.g. while the Denoiser scales up from zero)."""
        return 2 * self.max_batch if self.replicas else fallback

    @property
    def throughput_per_replica(self) -> float:
        return self.throughput / self.replicas if self.replicas else 0.0


def report_json(max_batch: int, throughput: float, now: float | None = None) -> str:
    return json.dumps({"max_batch": max_batch, "throughput": throughput, "at": time.time() if now is None else now})


def parse(raw: dict[str, str], now: float) -> tuple[Capacity, list[str]]:
    """(the sum of fresh reports, replicas whose reports are old enough to forget)."""
    replicas, max_batch, throughput, forget = 0, 0, 0.0, []
    for replica, value in raw.items():
        try:
            report = json.loads(value)
            age = now - float(report["at"])
            batch, rate = int(report["max_batch"]), float(report["throughput"])
        except (ValueError, KeyError, TypeError):
            forget.append(replica)
            continue
        if age > FORGET_SECONDS:
            forget.append(replica)
        elif age <= STALE_SECONDS:
            replicas, max_batch, throughput = replicas + 1, max_batch + batch, throughput + max(0.0, rate)
    return Capacity(replicas, max_batch, throughput), forget


def report(client: redis.Redis, replica: str, max_batch: int, throughput: float) -> None:
    """A replica's report (synchronous: the Denoiser writes it from its own thread)."""
    client.hset(redis_keys.DENOISERS, replica, report_json(max_batch, throughput))


def withdraw(client: redis.Redis, replica: str) -> None:
    client.hdel(redis_keys.DENOISERS, replica)


async def read(client: aioredis.Redis) -> Capacity:
    capacity, forget = parse(await client.hgetall(redis_keys.DENOISERS), time.time())
    if forget:
        await client.hdel(redis_keys.DENOISERS, *forget)
    return capacity


def read_sync(client: redis.Redis) -> Capacity:
    capacity, forget = parse(client.hgetall(redis_keys.DENOISERS), time.time())
    if forget:
        client.hdel(redis_keys.DENOISERS, *forget)
    return capacity
