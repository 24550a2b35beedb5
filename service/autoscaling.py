"""Scale the Denoiser on time: enough replicas to serve the queue's backlog within a target.

Serve's default policy scales on requests in flight, but here the work waits in Redis, not in
Serve. `BacklogPolicy` is a Ray Serve custom autoscaling policy (deployment
`autoscaling_config.policy`) that reads the queue's backlog as cost (row-steps waiting or in
flight: service.jobs.queue) and the replicas' measured throughput (row-steps per second each:
service.jobs.capacity), and asks for

    ceil(backlog / (throughput per replica x drain_target_seconds))

replicas within [min_replicas, max_replicas]; min_replicas (zero allowed) when the queue is
empty. One owner's waiting cost counts only up to what `owner_share` of max_replicas drains in
the target time, so a single tenant's flood cannot scale the deployment (and its bill) to the
top by itself; others' work still adds replicas beyond it. Until a replica has measured a throughput (a deployment scaled to zero), any backlog asks
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


def capped_backlog(inflight_cost: float, waiting_by_owner: dict[str, float], owner_cap: float) -> float:
    """The backlog autoscaling answers: the cost in flight (bounded by the intake window) plus
    each owner's waiting cost up to owner_cap."""
    return inflight_cost + sum(min(cost, owner_cap) for cost in waiting_by_owner.values())


class BacklogPolicy:
    """Class-callable Serve autoscaling policy; kwargs come from `policy_kwargs`.

    drain_target_seconds: how soon the backlog should be served. owner_share: the fraction of
    max_replicas one owner's waiting work may ask for. refresh_s: how often Redis is read; the
    policy is called every control-loop tick, so the reading is cached in between.
    """

    def __init__(
        self,
        drain_target_seconds: float = 60.0,
        owner_share: float = 0.5,
        refresh_s: float = 2.0,
        redis_url: str | None = None,
    ) -> None:
        if not 0 < owner_share <= 1:
            raise ValueError("owner_share must be in (0, 1]")
        self.drain_target_seconds = drain_target_seconds
        self.owner_share = owner_share
        self.refresh_s = refresh_s
        self._redis_url = redis_url
        self._client = None
        self._reading: tuple[int, dict[str, float], float] = (0, {}, 0.0)
        self._read_at = -math.inf

    def _read(self) -> tuple[int, dict[str, float], float]:
        """(cost in flight, {owner: cost waiting} in row-steps, measured row-steps per second
        per replica)."""
        from service.jobs import capacity, redis_keys
        from service.jobs.connection import sync_redis
        from service.jobs.queue import totals

        if self._client is None:
            url = self._redis_url
            if url is None:
                from service.settings import Settings

                url = Settings().redis_url
            self._client = sync_redis(url, 1.0)
        waiting = {owner: float(cost) for owner, cost in self._client.hgetall(redis_keys.QUEUE_WAITING_COST).items()}
        inflight = totals(self._client).inflight_cost
        return inflight, waiting, capacity.read_sync(self._client).throughput_per_replica

    def reading(self) -> tuple[int, dict[str, float], float] | None:
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
        inflight, waiting, throughput = reading
        max_replicas = ctx.capacity_adjusted_max_replicas
        owner_cap = self.owner_share * max_replicas * throughput * self.drain_target_seconds
        backlog = capped_backlog(inflight, waiting, owner_cap) if throughput > 0 else inflight + sum(waiting.values())
        wanted = desired_replicas(
            backlog,
            throughput,
            drain_target_seconds=self.drain_target_seconds,
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=max_replicas,
        )
        return wanted, {"backlog": backlog, "throughput_per_replica": throughput}
