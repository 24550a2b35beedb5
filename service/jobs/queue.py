"""The shard queue: a Redis Stream read through one consumer group. Nothing else touches it.

Delivery is at-least-once. A consumer reads a shard (XREADGROUP), heart-beats it while it works
(XCLAIM to itself resets the idle time), and settles it exactly one way: ack, requeue as the
next attempt, or dead-letter. Settling deletes the message in the same MULTI/EXEC as the ack
(and the XADD of the requeued or dead-lettered copy), so the stream's length is the backlog.
A message idle longer than the visibility timeout belongs to a dead consumer and is taken over
with XAUTOCLAIM.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import ResponseError

from service.jobs import keys
from service.jobs.schemas import ShardTask

DEAD_LETTER_MAXLEN = 10_000


@dataclass
class Message:
    """One delivery: the stream id, the raw fields, and the task (None if they do not parse)."""

    id: str
    fields: dict[str, str]
    task: ShardTask | None


def parse_task(fields: dict[str, str]) -> ShardTask | None:
    try:
        return ShardTask.model_validate_json(fields["task"])
    except (KeyError, ValidationError):
        return None


def backlog(client: redis.Redis) -> int:
    """Shards waiting or in flight, read with a synchronous client (the autoscaling policy's)."""
    return int(client.xlen(keys.SHARD_STREAM))


class ShardQueue:
    def __init__(self, client: aioredis.Redis) -> None:
        self.r = client
        self._reclaim_from: dict[str, str] = {}  # consumer -> XAUTOCLAIM cursor

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if they do not exist yet."""
        try:
            await self.r.xgroup_create(keys.SHARD_STREAM, keys.CONSUMER_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    @staticmethod
    def enqueue(pipe: aioredis.client.Pipeline, tasks: list[ShardTask]) -> None:
        """Add tasks to a pipeline, so that they are queued in the caller's MULTI/EXEC."""
        for task in tasks:
            pipe.xadd(keys.SHARD_STREAM, {"task": task.model_dump_json()})

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Message]:
        """Up to count new messages for consumer, waiting at most block_ms for the first."""
        reply = await self.r.xreadgroup(
            keys.CONSUMER_GROUP, consumer, {keys.SHARD_STREAM: ">"}, count=count, block=block_ms
        )
        return [
            Message(mid, fields, parse_task(fields)) for _stream, messages in reply or [] for mid, fields in messages
        ]

    async def reclaim(self, consumer: str, idle_ms: int, count: int = 50) -> list[Message]:
        """Take over up to count messages idle for at least idle_ms (their consumer stopped
        heart-beating), continuing from where this consumer's previous call stopped (so a long
        pending list is walked, not its first page re-read). Entries deleted meanwhile come back
        without fields and are skipped."""
        start = self._reclaim_from.get(consumer, "0-0")
        cursor, claimed, *_ = await self.r.xautoclaim(
            keys.SHARD_STREAM, keys.CONSUMER_GROUP, consumer, idle_ms, start_id=start, count=count
        )
        self._reclaim_from[consumer] = cursor  # "0-0" once the whole list was walked
        return [Message(mid, fields, parse_task(fields)) for mid, fields in claimed if fields]

    async def prune_consumers(self, idle_ms: int, keep: str) -> list[str]:
        """Remove group members idle for idle_ms that hold no pending message (replicas that
        went away), except keep. Returns their names."""
        gone = []
        for c in await self.r.xinfo_consumers(keys.SHARD_STREAM, keys.CONSUMER_GROUP):
            if c["name"] != keep and c["pending"] == 0 and c["idle"] >= idle_ms:
                await self.r.xgroup_delconsumer(keys.SHARD_STREAM, keys.CONSUMER_GROUP, c["name"])
                gone.append(c["name"])
        return gone

    async def heartbeat(self, consumer: str, message_id: str) -> None:
        """Reset the message's idle time, so nobody reclaims it while consumer works on it."""
        await self.r.xclaim(keys.SHARD_STREAM, keys.CONSUMER_GROUP, consumer, 0, [message_id], justid=True)

    async def ack(self, message_id: str) -> None:
        await self._settle(message_id)

    async def requeue(self, message_id: str, task: ShardTask) -> None:
        """Put the shard back as its next attempt and ack the old message, atomically."""
        await self.put_back(message_id, task.model_copy(update={"attempt": task.attempt + 1}))

    async def put_back(self, message_id: str, task: ShardTask) -> None:
        """Put the shard back as it is given (no attempt spent) and ack the old message, atomically."""
        await self._settle(message_id, keys.SHARD_STREAM, {"task": task.model_dump_json()})

    async def dead_letter(self, message_id: str, fields: dict[str, str], reason: str) -> None:
        """Move a message (a shard out of attempts, or one that does not parse) to the
        dead-letter stream, atomically with its ack."""
        await self._settle(message_id, keys.DEAD_LETTER_STREAM, {**fields, "reason": reason})

    async def depth(self) -> int:
        """Shards waiting or in flight (handled messages are deleted as they are settled)."""
        return int(await self.r.xlen(keys.SHARD_STREAM))

    async def _settle(self, message_id: str, stream: str | None = None, fields: dict[str, str] | None = None) -> None:
        """Ack and delete a handled message, after appending fields to stream if given, in one
        MULTI/EXEC."""
        async with self.r.pipeline(transaction=True) as pipe:
            if stream is not None:
                maxlen = DEAD_LETTER_MAXLEN if stream == keys.DEAD_LETTER_STREAM else None
                pipe.xadd(stream, fields, maxlen=maxlen)
            pipe.xack(keys.SHARD_STREAM, keys.CONSUMER_GROUP, message_id)
            pipe.xdel(keys.SHARD_STREAM, message_id)
            await pipe.execute()
