"""Scale the Denoiser on time: enough replicas to serve the queue's backlog within a target.

Serve's default policy scales on requests in flight, but here the work waits in Redis, not in
Serve. `BacklogPolicy` is a Ray Serve custom autoscaling policy (deployment
`autoscaling_config.policy`) that reads the queue's backlog as cost (row-steps waiting or in
flight: service.jobs.queue) and the replicas' measured throughput (row-steps per second each:
service.jobs.capacity), and asks for

    ceil(backlog / (throughput per replica x drain_target_seconds))

replicas within [min_replicas, max_replicas]; min_replicas (zero allowed) when the queue is
empty. Until a replica has measured a throughput (a deployment scaled to zero), any backlog asks
for one replica. On KubeRay, replicas that do not fit on the running GPU pods make the in-tree
autoscaler add GPU pods; replicas that go away leave idle pods that it removes. Serve applies its
own upscale/downscale delays on top.
"""

from __future__ import annotations

import math
import time
from typing import Any

Decision = tuple[int, dict[str, Any]]


def desired_replicas(
    backlog_cost: float,
    throughput_per_replica: float,
    *,
    drain_target_seconds: float,
    min_replicas: int,
    max_replicas: int,
) -> int:
    """Replicas that serve backlog_cost (row-steps) within drain_target_seconds at
    throughput_per_replica (row-steps/s; 0 when unknown: one replica for any backlog), clamped
    to [min_replicas, max_replicas]; min_replicas for an empty queue."""
    if drain_target_seconds <= 0:
        raise ValueError("drain_target_seconds must be > 0")
    if backlog_cost <= 0:
        wanted = 0
    elif throughput_per_replica <= 0:
        wanted = 1
    else:
        wanted = math.ceil(backlog_cost / (throughput_per_replica * drain_target_seconds))
    return max(min_replicas, min(max_replicas, wanted))


class BacklogPolicy:
    """Class-callable Serve autoscaling policy; kwargs come from `policy_kwargs`.

    drain_target_seconds: how soon the backlog should be served. refresh_s: how often Redis is
    read; the policy is called every control-loop tick, so the reading is cached in between.
    """

    def __init__(
        self, drain_target_seconds: float = 60.0, refresh_s: float = 2.0, redis_url: str | None = None
    ) -> None:
        self.drain_target_seconds = drain_target_seconds
        self.refresh_s = refresh_s
        self._redis_url = redis_url
        self._client = None
        self._reading: tuple[int, float] = (0, 0.0)
        self._read_at = -math.inf

    def _read(self) -> tuple[int, float]:
        """(backlog cost in row-steps, measured row-steps per second per replica)."""
        from service.jobs import capacity
        from service.jobs.connection import sync_redis
        from service.jobs.queue import totals

        if self._client is None:
            url = self._redis_url
            if url is None:
                from service.settings import Settings

                url = Settings().redis_url
            self._client = sync_redis(url, 1.0)
        return totals(self._client).cost, capacity.read_sync(self._client).throughput_per_replica

    def reading(self) -> tuple[int, float] | None:
        now = time.monotonic()
        if now - self._read_at >= self.refresh_s:
            try:
                self._reading = self._read()
                self._read_at = now
            except Exception:  # Redis unreachable: no decision from stale data
                return None
        return self._reading

    def __call__(self, ctx) -> Decision:
        reading = self.reading()
        if reading is None:
            return ctx.target_num_replicas, {"backlog": None}
        backlog, throughput = reading
        wanted = desired_replicas(
            backlog,
            throughput,
            drain_target_seconds=self.drain_target_seconds,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
        )
        return wanted, {"backlog": backlog, "throughput_per_replica": throughput}
