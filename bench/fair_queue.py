"""The fair queue alone (service.jobs.queue) against a local Redis-compatible server, no
Denoiser, no HTTP:

  (a) intake cost: admitting and settling 2,000 shards with 10,000 shards of 100 owners waiting,
      against the same with 10 waiting (goal <= 1.5x);
  (b) Redis cost: commands and bytes per job (submit) and per shard (admit, heartbeat, ack),
      from INFO commandstats and the server's network counters;
  (c) what one primary sustains: admit + ack pairs per second from 8 concurrent clients;
  (d) a simulation of 1,000 owners with a Zipf-shaped workload (owner k submits in proportion
      to 1/k; job sizes 1-64 images, 10-200 steps) on an engine model that runs max_batch rows
      per step, fairly across the owners it holds: each owner's share of the row-steps served
      while it had work waiting, and 1-image jobs' latency (in engine steps) against their
      steps alone, as percentiles.

    python bench/fair_queue.py [--owners 1000] [--steps 3000]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

if not __package__:  # run as `python bench/fair_queue.py`: this file must not shadow the package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from service.jobs import redis_keys  # noqa: E402
from service.jobs.connection import async_redis  # noqa: E402
from service.jobs.queue import ShardQueue, shard_cost  # noqa: E402
from service.jobs.records import JobParams, ShardTask  # noqa: E402
from service.jobs.store import JobStore  # noqa: E402

FAR = 2**62
SHARD = 16


def params(images: int, steps: int) -> JobParams:
    return JobParams(
        model="mnist",
        num_images=images,
        steps=steps,
        sampler="ddim",
        eta=0.0,
        seed=0,
        class_label=1,
        guidance_scale=1.0,
    )


async def enqueue_job(q: ShardQueue, owner: str, job: str, images: int, steps: int) -> list[ShardTask]:
    p = params(images, steps)
    tasks = [
        ShardTask(job_id=job, shard=k, start=s, count=min(SHARD, images - s), owner=owner, params=p)
        for k, s in enumerate(range(0, images, SHARD))
    ]
    async with q.r.pipeline(transaction=True) as pipe:
        pipe.multi()
        await q.enqueue(pipe, redis_keys.job(job), owner, tasks)
        await pipe.execute()
    return tasks


async def intake_cost(q: ShardQueue, waiting_shards: int, owners: int, rounds: int = 2000) -> float:
    """Seconds per admitted-and-settled shard with `waiting_shards` of `owners` waiting."""
    await q.r.flushdb()
    per_owner = waiting_shards // owners
    for o in range(owners):
        await enqueue_job(q, f"o{o}", f"j{o}", per_owner * SHARD, 10)
    start = time.perf_counter()
    for k in range(rounds):
        (m,) = await q.read("bench", FAR, window=10**9, count=1)
        await q.ack(m.id)
        await enqueue_job(q, m.task.owner, f"r{k}", SHARD, 10)  # keep the backlog where it was
    return (time.perf_counter() - start) / rounds


async def redis_cost(url: str) -> dict[str, float]:
    """Commands and bytes of one 64-image job's submission (4 shards) and of one shard's admit,
    heartbeat and ack."""
    store = JobStore.from_url(url, 3600, SHARD)
    r = store.r
    await r.flushdb()

    async def snapshot():
        stats, info = await r.info("commandstats"), await r.info("stats")
        calls = sum(v["calls"] for k, v in stats.items() if k.startswith("cmdstat_"))
        return calls, info["total_net_input_bytes"], info["total_net_output_bytes"]

    await store.submit("warm", params(64, 50), {"n": 64})
    a = await snapshot()
    b = await snapshot()
    overhead = (b[0] - a[0], b[1] - a[1], b[2] - a[2])  # a snapshot's own commands and bytes
    c0, i0, o0 = await snapshot()
    await store.submit("alice", params(64, 50), {"n": 64})
    c1, i1, o1 = await snapshot()
    messages = await store.queue.read("bench", FAR, window=10**6, count=1)
    await store.queue.heartbeat(messages[0].id, FAR)
    await store.queue.ack(messages[0].id)
    c2, i2, o2 = await snapshot()
    await store.close()
    # each interval holds one snapshot's own INFO calls and replies: taken off
    return {
        "job_commands": c1 - c0 - overhead[0],
        "job_bytes": (i1 - i0) + (o1 - o0) - overhead[1] - overhead[2],
        "shard_commands": c2 - c1 - overhead[0],
        "shard_bytes": (i2 - i1) + (o2 - o1) - overhead[1] - overhead[2],
    }


async def sustained(url: str, clients: int = 8, seconds: float = 5.0) -> tuple[float, float]:
    """Admit + ack pairs per second from `clients` concurrent connections (backlog kept full),
    and the server's own time per pair (INFO commandstats), whose inverse is what one
    single-threaded primary sustains when clients are not the limit."""
    qs = [ShardQueue(async_redis(url, 5.0)) for _ in range(clients)]
    await qs[0].r.flushdb()
    for o in range(100):
        await enqueue_job(qs[0], f"o{o}", f"j{o}", 600 * SHARD, 10)  # more than 8 clients settle in the time
    await qs[0].r.config_resetstat()
    done = 0
    stop = time.perf_counter() + seconds

    async def loop(q: ShardQueue):
        nonlocal done
        while time.perf_counter() < stop:
            got = await q.read("bench", FAR, window=10**9, count=1)
            if got:
                await q.ack(got[0].id)
                done += 1

    start = time.perf_counter()
    await asyncio.gather(*(loop(q) for q in qs))
    rate = done / (time.perf_counter() - start)
    stats = await qs[0].r.info("commandstats")
    server_usec = sum(v["usec"] for k, v in stats.items() if k in ("cmdstat_evalsha", "cmdstat_eval"))
    for q in qs:
        await q.r.aclose()
    return rate, server_usec / max(done, 1)


def engine_step(held: dict, queued: set, served: dict, max_batch: int, rng: random.Random) -> None:
    """One engine step: round robin over the owners held, one shard each per pass, up to
    max_batch rows; counts the rows of owners with shards waiting in `served`."""
    budget, advanced = max_batch, True
    order = list(held)
    rng.shuffle(order)
    cursor = {o: 0 for o in order}
    while budget > 0 and advanced:
        advanced = False
        for o in order:
            i = cursor[o]
            if i < len(held[o]) and held[o][i][2] <= budget:
                held[o][i][1] -= 1
                budget -= held[o][i][2]
                served[o] += held[o][i][2] if o in queued else 0
                cursor[o] += 1
                advanced = True


async def simulate(q: ShardQueue, owners: int, engine_steps: int, max_batch: int, seed: int = 0) -> dict:
    """A discrete-time model of the service: jobs arrive (owner k with weight 1/k), one Worker
    admits with window 2 x max_batch each step, the engine advances up to max_batch rows per
    step round-robin over the owners it holds, and finished shards are acked."""
    rng = random.Random(seed)
    await q.r.flushdb()
    weights = [1 / (k + 1) for k in range(owners)]
    window = 2 * max_batch
    held: dict[str, list] = defaultdict(list)  # owner -> [[message, steps left, rows]]
    jobs: dict[str, dict] = {}
    served: dict[str, int] = defaultdict(int)  # row-steps served in steps where the owner had shards waiting
    waiting_steps: dict[str, int] = defaultdict(int)  # steps during which the owner had shards waiting
    submitted: dict[str, int] = defaultdict(int)  # row-steps submitted
    small_alone: list[float] = []  # 1-image jobs of owners with nothing else waiting or running
    small_behind: list[float] = []  # 1-image jobs queued behind their own owner's work
    arrivals_per_step = 0.35
    n = 0
    for step in range(engine_steps):
        # arrivals
        for _ in range(rng.random() < arrivals_per_step and 1 or 0):
            owner = f"o{rng.choices(range(owners), weights)[0]}"
            images = 1 if rng.random() < 0.3 else rng.choice([4, 16, 32, 64])
            steps = rng.choice([10, 20, 50, 100, 200])
            job = f"j{n}"
            n += 1
            alone = owner not in held and not int(await q.r.hget(redis_keys.QUEUE_WAITING_COST, owner) or 0)
            tasks = await enqueue_job(q, owner, job, images, steps)
            submitted[owner] += images * steps
            jobs[job] = {"left": len(tasks), "arrived": step, "steps": steps, "images": images, "alone": alone}
        # admission
        for m in await q.read("sim", FAR, window=window):
            cost, rows = shard_cost(m.task)
            held[m.task.owner].append([m, m.task.params.steps, rows])
        queued = {o for o, c in (await q.r.hgetall(redis_keys.QUEUE_WAITING_COST)).items() if int(c) > 0}
        for o in queued:
            waiting_steps[o] += 1
        engine_step(held, queued, served, max_batch, rng)
        for o in list(held):
            for entry in [e for e in held[o] if e[1] <= 0]:
                held[o].remove(entry)
                await q.ack(entry[0].id)
                job = jobs[entry[0].task.job_id]
                job["left"] -= 1
                if job["left"] == 0 and job["images"] == 1:
                    (small_alone if job["alone"] else small_behind).append((step + 1 - job["arrived"]) / job["steps"])
            if not held[o]:
                del held[o]

    def pct(values: list[float]) -> str:
        values = sorted(values)
        at = lambda p: values[min(len(values) - 1, int(p * len(values)))]  # noqa: E731
        return f"p50 {at(0.5):.2f}, p90 {at(0.9):.2f}, p99 {at(0.99):.2f} (n={len(values)})" if values else "none"

    rates = sorted(served[o] / waiting_steps[o] for o in waiting_steps if waiting_steps[o] >= 50)
    top = max(submitted, key=submitted.get)
    jain = sum(rates) ** 2 / (len(rates) * sum(x * x for x in rates)) if rates else float("nan")
    return {
        "jobs": n,
        "owners_served": len(served),
        "small_alone": pct(small_alone),
        "small_behind": pct(small_behind),
        "jain": jain,
        "rate_min": rates[0] if rates else 0,
        "rate_median": statistics.median(rates) if rates else 0,
        "rate_max": rates[-1] if rates else 0,
        "rated_owners": len(rates),
        "top_submitted": submitted[top] / sum(submitted.values()),
        "top_rate": served[top] / max(1, waiting_steps[top]),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--owners", type=int, default=1000)
    p.add_argument("--steps", type=int, default=3000, help="engine steps simulated in (d)")
    p.add_argument("--max-batch", type=int, default=256)
    args = p.parse_args()

    from service.dev.servers import RedisServer

    with RedisServer(Path(tempfile.mkdtemp(prefix="undiffuse-fairq-"))).start() as redis:
        url = redis.url

        async def run():
            q = ShardQueue(async_redis(url, 5.0))
            small = await intake_cost(q, 10, 10)
            large = await intake_cost(q, 10_000, 100)
            cost = await redis_cost(url)
            rate = await sustained(url)
            sim = await simulate(q, args.owners, args.steps, args.max_batch)
            await q.r.aclose()
            return small, large, cost, rate, sim

        small, large, cost, rate, sim = asyncio.run(run())
        server = redis.version() if hasattr(redis, "version") else "redis-compatible server"

    print(
        f"# {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}, {server}"
    )
    print("| benchmark | reference | measured | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| (a) admit + ack + enqueue one shard: 10,000 of 100 owners waiting vs 10 waiting | {small * 1e3:.3f} ms "
        f"| {large * 1e3:.3f} ms | {large / small:.2f}x | <= 1.5x |"
    )
    print(
        f"| (b) Redis commands executed (scripts' inner calls included) and bytes on the wire per 64-image job (4 shards) submitted / per shard admitted, heart-beaten once, acked | — "
        f"| {cost['job_commands']} commands, {cost['job_bytes']:,} bytes / {cost['shard_commands']} commands, "
        f"{cost['shard_bytes']:,} bytes | — | — |"
    )
    pairs, usec = rate
    print(
        f"| (c) admit + ack pairs per second, one primary: 8 Python clients / the server's own time per pair "
        f"| — | {pairs:,.0f}/s / {usec:.0f} µs (at most {1e6 / usec:,.0f}/s on one core) | — | — |"
    )
    print(
        f"| (d) {args.owners} owners, Zipf workload, {args.steps} engine steps of {args.max_batch} rows: "
        f"{sim['jobs']} jobs, {sim['owners_served']} owners served | — | 1-image jobs' latency / their steps: "
        f"of owners with nothing else waiting or running {sim['small_alone']}; behind their own owner's work "
        f"{sim['small_behind']}; row-steps per "
        f"step while it had shards waiting ({sim['rated_owners']} owners waiting >= 50 steps): min {sim['rate_min']:.1f}, median "
        f"{sim['rate_median']:.1f}, max {sim['rate_max']:.1f}, Jain index {sim['jain']:.3f}; the heaviest owner submitted "
        f"{sim['top_submitted']:.0%} of the work and was served {sim['top_rate']:.1f} row-steps per step | — | — |"
    )


if __name__ == "__main__":
    main()
