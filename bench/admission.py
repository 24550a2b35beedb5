"""Admission through the HTTP API of a local stack (Redis-compatible server, SeaweedFS, Ray
Serve with the application's default settings), started by this script; each figure side by
side with its reference in one run:

  (1) same owner: a 64-image, 300-step DDPM job, then (once it runs) 1-image DDIM-10 jobs of
      the same owner, one every 2 s: their median time against the same job alone (the median
      of 5 after a warm-up; goal <= 1.5x);
  (2) two owners: owner A queues 8 jobs of 64 images x 200 DDPM steps (32 shards), then owner
      B submits 1-image DDIM-10 jobs, one every 2 s: their median time against alone (goal
      <= 1.5x), and A's images/s;
  (3) fill (--fill, its own stack with --max-batch 1024): a backlog of 4 jobs of 1,024 images
      x 10 DDIM steps; mean rows per network call, the rows the jobs need over the network
      calls the Denoiser's metrics count (undiffuse_sampler_batch_images), against max_batch
      (goal >= 90 %).

A job's time runs from its POST to its `succeeded` status, read from its record in Redis (what
GET /v1/jobs/{id} reads), so that polling does not load the machine's HTTP proxy.

    python bench/admission.py                  # (1) and (2)
    python bench/admission.py --fill --max-batch 1024
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python bench/admission.py`: this file must not shadow the package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx  # noqa: E402

KEYS = {"alice": "bench-key-alice", "bob": "bench-key-bob"}
SMALL = {"num_images": 1, "steps": 10, "sampler": "ddim", "class_label": 3, "seed": 7}


class Owner:
    """One API key's client; job states are read from Redis."""

    def __init__(self, base: str, key: str, redis) -> None:
        self.client = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        self.redis = redis

    async def submit(self, body: dict) -> str:
        r = await self.client.post("/v1/jobs", json=body)
        r.raise_for_status()
        return r.json()["id"]

    async def status(self, job_id: str) -> str:
        from service.jobs import redis_keys

        return await self.redis.hget(redis_keys.job(job_id), "status")

    async def wait(self, job_id: str, statuses=("succeeded",), poll: float = 0.005) -> str:
        while (status := await self.status(job_id)) not in (*statuses, "failed", "canceled"):
            await asyncio.sleep(poll)
        if status in ("failed", "canceled"):
            raise RuntimeError(f"job {job_id} {status}")
        return status

    async def run(self, body: dict) -> float:
        start = time.perf_counter()
        await self.wait(await self.submit(body))
        return time.perf_counter() - start


async def solo(owner: Owner, repeats: int = 5) -> float:
    await owner.run(SMALL)  # warm up
    return statistics.median([await owner.run(SMALL) for _ in range(repeats)])


async def same_owner(alice: Owner, repeats: int) -> tuple[list[float], float, bool]:
    """(the small jobs' times behind the big one, one every 2 s, the big job's time, whether the
    small ones all ended first)."""
    start = time.perf_counter()
    big = await alice.submit({"num_images": 64, "steps": 300, "sampler": "ddpm", "class_label": 1, "seed": 1})
    await alice.wait(big, ("running",))
    times = []
    for _ in range(repeats):
        await asyncio.sleep(2.0)  # the big job's shards are all stepping
        times.append(await alice.run(SMALL))
    small_first = await alice.status(big) == "running"
    await alice.wait(big, poll=0.1)
    return times, time.perf_counter() - start, small_first


async def two_owners(alice: Owner, bob: Owner, jobs: int, repeats: int) -> tuple[list[float], float]:
    """(B's small jobs' times behind A's backlog, one every 2 s, A's images per second)."""
    body = {"num_images": 64, "steps": 200, "sampler": "ddpm", "class_label": 2, "seed": 2}
    start = time.perf_counter()
    ids = [await alice.submit(body) for _ in range(jobs)]
    await alice.wait(ids[0], ("running",))
    times = []
    for _ in range(repeats):
        await asyncio.sleep(2.0)
        times.append(await bob.run(SMALL))
    for job_id in ids:
        await alice.wait(job_id, poll=0.1)
    return times, jobs * 64 / (time.perf_counter() - start)


async def fill(alice: Owner, metrics_url: str, jobs: int = 4) -> tuple[float, float, float]:
    """(rows the jobs need, network calls, the histogram's sum of rows) over a saturating
    backlog, the calls and sum from the Denoiser's metrics."""
    body = {"num_images": 1024, "steps": 10, "sampler": "ddim", "class_label": 4, "seed": 4}
    before = await rows_per_call(metrics_url)
    ids = [await alice.submit(body) for _ in range(jobs)]
    for job_id in ids:
        await alice.wait(job_id, poll=0.2)
    after = await rows_per_call(metrics_url)
    while True:  # until the metrics agent has exported every step (two scrapes 3 s apart agree)
        await asyncio.sleep(3.0)
        again = await rows_per_call(metrics_url)
        if again == after:
            break
        after = again
    return jobs * body["num_images"] * body["steps"], after[1] - before[1], after[0] - before[0]


async def rows_per_call(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of the Denoiser's rows-per-network-call histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=10) as c:
        text = (await c.get(metrics_url)).text
    total = count = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "ray_undiffuse_sampler_batch_images_sum":
                total += s.value
            elif s.name == "ray_undiffuse_sampler_batch_images_count":
                count += s.value
    return total, count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fill", action="store_true", help="run (3) instead of (1) and (2)")
    p.add_argument("--max-batch", type=int, default=None, help="max_batch_images (default: the application's)")
    p.add_argument(
        "--latency-slack", type=float, default=None, help="the engine's latency_slack (default: the setting's)"
    )
    p.add_argument("--jobs", type=int, default=8, help="owner A's jobs in (2)")
    p.add_argument("--repeats", type=int, default=5, help="small jobs behind the load in (1) and (2), 2 s apart")
    args = p.parse_args()

    from service.api_keys import digest
    from service.dev.stack import local_stack
    from service.jobs.connection import async_redis

    work = Path(tempfile.mkdtemp(prefix="undiffuse-admission-"))
    settings = {"api_keys": [f"{owner}=sha256:{digest(key)}" for owner, key in KEYS.items()]}
    if args.latency_slack:
        settings["latency_slack"] = args.latency_slack
    app_args = {"max_batch_images": args.max_batch} if args.max_batch else {}
    ray_options = {
        "logging_level": "ERROR",
        "log_to_driver": False,
        "_system_config": {"metrics_report_interval_ms": 1000},
    }
    with local_stack(work, settings, ray_options=ray_options, **app_args) as stack:
        base = stack.base_url

        async def run_all():
            r = async_redis(stack.redis.url, 5.0)
            alice, bob = Owner(base, KEYS["alice"], r), Owner(base, KEYS["bob"], r)
            if args.fill:
                return await fill(alice, stack.metrics_url)
            alone = await solo(bob)
            same = await same_owner(alice, args.repeats)
            return alone, same, await two_owners(alice, bob, args.jobs, args.repeats)

        result = asyncio.run(run_all())

    print(
        f"# {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| benchmark | reference | measured | ratio | goal |")
    print("|---|---|---|---|---|")
    if args.fill:
        rows, calls, summed = result
        mean = rows / max(calls, 1)
        batch = args.max_batch or 32
        slack = f", latency_slack {args.latency_slack:g}" if args.latency_slack else ""
        print(
            f"| (3) rows per network call under a backlog, max_batch {batch}{slack}: the {rows:,} rows the jobs "
            f"need over the histogram's {calls:.0f} calls (its _sum read {summed:,.0f}) | {batch} | {mean:.0f} "
            f"| {mean / batch:.1%} | >= 90 % |"
        )
        return
    alone, (small, big, first), (behind_a, a_rate) = result

    def spread(times: list[float]) -> str:
        return f"median {statistics.median(times):.2f} s (max {max(times):.2f} s, n={len(times)})"

    print(
        f"| (1) same owner: 1-image DDIM 10 behind its 64-image DDPM 300 vs alone | {alone:.2f} s | {spread(small)}"
        f" ({'all before' if first else 'not all before'} the big job, which took {big:.1f} s) "
        f"| {statistics.median(small) / alone:.2f}x | <= 1.5x |"
    )
    print(
        f"| (2) two owners: B's 1-image DDIM 10 behind A's {args.jobs} x 64-image DDPM 200 vs alone | {alone:.2f} s "
        f"| {spread(behind_a)} | {statistics.median(behind_a) / alone:.2f}x | <= 1.5x |"
    )
    print(f"| (2) A's images/s meanwhile | — | {a_rate:.2f} img/s | — | not below the previous queue's |")


if __name__ == "__main__":
    main()
