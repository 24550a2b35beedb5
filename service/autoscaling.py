"""Scale the Denoiser with the Redis queue's backlog.

Serve's default policy scales on requests in flight, but here the work waits in Redis, not in
Serve: with 2 replicas busy and 500 shards queued, Serve sees only the handful of requests the
workers have in flight. `BacklogPolicy` is a Ray Serve custom autoscaling policy (deployment
`autoscaling_config.policy`) that reads the stream's length and asks for one replica per
`shards_per_replica` waiting shards, within [min_replicas, max_replicas]. On KubeRay, replicas
that do not fit on the running GPU pods make the in-tree autoscaler add GPU pods; replicas that
go away leave idle pods that it removes. Serve applies its own upscale/downscale delays on top.
"""

from __future__ import annotations

import math
import time
from typing import Any

Decision = tuple[int, dict[str, Any]]


def desired_replicas(
    backlog: int, in_flight: float, *, shards_per_replica: float, min_replicas: int, max_replicas: int
) -> int:
    """Replicas for a backlog of waiting shards plus the Serve requests already in flight.

    Empty queue and nothing running -> min_replicas; otherwise ceil(work / shards_per_replica),
    clamped to [min_replicas, max_replicas].
    """
    if shards_per_replica <= 0:
        raise ValueError("shards_per_replica must be > 0")
    work = max(0, backlog) + max(0.0, in_flight)
    wanted = math.ceil(work / shards_per_replica) if work > 0 else 0
    return max(min_replicas, min(max_replicas, wanted))


class BacklogPolicy:
    """Class-callable Serve autoscaling policy; kwargs come from `policy_kwargs`.

    shards_per_replica: shards one replica should have waiting or running (about
    max_batch_images / shard_size keeps every batch full). refresh_s: how often Redis is read;
    the policy is called every control-loop tick, so the backlog is cached in between.
    """

    def __init__(self, shards_per_replica: float = 4.0, refresh_s: float = 2.0, redis_url: str | None = None) -> None:
        self.shards_per_replica = shards_per_replica
        self.refresh_s = refresh_s
        self._redis_url = redis_url
        self._client = None
        self._backlog = 0
        self._read_at = -math.inf

    def _read_backlog(self) -> int:
        from service.jobs.connection import sync_redis
        from service.jobs.queue import backlog

        if self._client is None:
            url = self._redis_url
            if url is None:
                from service.settings import Settings

                url = Settings().redis_url
            self._client = sync_redis(url, 1.0)
        return backlog(self._client)

    def backlog(self) -> int | None:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            try:
                self._backlog = self._read_backlog()
                self._read_at = now
            except Exception:  # Redis unreachable: no decision from stale data
                return None
        return self._backlog

    def __call__(self, ctx) -> Decision:
        backlog = self.backlog()
        if backlog is None:
            return ctx.target_num_replicas, {"backlog": None}
        wanted = desired_replicas(
            backlog,
            ctx.total_num_requests,
            shards_per_replica=self.shards_per_replica,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        return wanted, {"backlog": backlog}
