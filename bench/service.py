"""Service benchmarks, each side by side against its reference in one run, on a local stack
(Redis-compatible server, SeaweedFS, Ray Serve) started by this script:

  (a) overhead: a 16-image DDIM-50 job end to end over HTTP (queue, worker, PNG, S3) against
      a direct call of the Sampler deployment for the same 16 images -> ratio (goal <= 1.10);
  (b) POST /v1/jobs throughput and p50/p99 latency with 32 concurrent clients (goal >= 300/s);
  (c) 16 concurrent one-image jobs against the same 16 run one after another -> batching gain.

    python bench/service.py [--requests 2000] [--clients 32]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx

KEY = "bench-key"


async def wait_done(client: httpx.AsyncClient, job_id: str, poll: float = 0.01) -> dict:
    while True:
        body = (await client.get(f"/v1/jobs/{job_id}")).json()
        if body["status"] in ("succeeded", "failed", "canceled"):
            assert body["status"] == "succeeded", body
            return body
        await asyncio.sleep(poll)


async def run_job(client: httpx.AsyncClient, body: dict) -> float:
    start = time.perf_counter()
    r = await client.post("/v1/jobs", json=body)
    r.raise_for_status()
    await wait_done(client, r.json()["id"])
    return time.perf_counter() - start


async def overhead(client, sampler, repeats: int) -> tuple[float, float]:
    from service.schemas import JobParams, ShardTask

    body = {
        "num_images": 16,
        "steps": 50,
        "sampler": "ddim",
        "class_label": list(range(10)) + list(range(6)),
        "seed": 0,
    }
    params = JobParams(
        model="mnist",
        num_images=16,
        steps=50,
        sampler="ddim",
        eta=0.0,
        seed=0,
        class_label=body["class_label"],
        guidance_scale=1.0,
    )
    task = ShardTask(job_id="bench-direct", shard=0, start=0, count=16, params=params)
    await sampler.generate.remote(task)  # warm up both paths
    await run_job(client, body)
    direct, e2e = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        await sampler.generate.remote(task)
        direct.append(time.perf_counter() - t)
        e2e.append(await run_job(client, body))
    return statistics.median(direct), statistics.median(e2e)


async def submit_throughput(base_url: str, requests: int, clients: int) -> tuple[float, float, float, int]:
    latencies: list[float] = []
    errors = 0
    body = {"num_images": 1, "steps": 1, "class_label": 0}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, limits=limits, timeout=30
    ) as c:
        queue = list(range(requests))

        async def client_loop():
            nonlocal errors
            while queue:
                queue.pop()
                t = time.perf_counter()
                r = await c.post("/v1/jobs", json=body)
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != 202

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return requests / wall, p(0.50), p(0.99), errors


async def batching(client, n: int = 16) -> tuple[float, float]:
    body = {"num_images": 1, "steps": 50, "sampler": "ddim", "class_label": 3}
    start = time.perf_counter()
    for _ in range(n):
        await run_job(client, body)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(run_job(client, body) for _ in range(n)))
    concurrent = time.perf_counter() - start
    return sequential, concurrent


async def drain(redis_url: str) -> None:
    from service import keys
    from service.store import async_redis

    r = async_redis(redis_url, 2.0)
    while await r.xlen(keys.SHARD_STREAM):
        await asyncio.sleep(0.2)
    await r.aclose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import ray
    from ray import serve

    from service.app import AppArgs, build_app
    from service.localstack import RedisServer, S3Server, free_port

    work = Path(tempfile.mkdtemp(prefix="undiffuse-bench-"))
    redis = RedisServer(work / "redis").start()
    s3 = S3Server(work / "s3", access_key="bench", secret_key="bench-secret-123").start()
    port = free_port()
    try:
        ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = {
            "redis_url": redis.url,
            "s3_endpoint_url": s3.endpoint,
            "s3_access_key_id": "bench",
            "s3_secret_access_key": "bench-secret-123",
            "api_keys": [KEY],
        }
        serve.run(build_app(AppArgs(settings=settings)), name="undiffuse", route_prefix="/")
        sampler = serve.get_deployment_handle("Sampler", app_name="undiffuse")
        base = f"http://127.0.0.1:{port}"

        async def all_benchmarks():
            async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120) as c:
                direct, e2e = await overhead(c, sampler, args.repeats)
                seq, conc = await batching(c)
            rate, p50, p99, errors = await submit_throughput(base, args.requests, args.clients)
            await drain(redis.url)
            return direct, e2e, seq, conc, rate, p50, p99, errors

        direct, e2e, seq, conc, rate, p50, p99, errors = asyncio.run(all_benchmarks())
    finally:
        serve.shutdown()
        ray.shutdown()
        s3.stop()
        redis.stop()

    print(
        f"# {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| benchmark | reference | undiffuse | ratio | goal |")
    print("|---|---|---|---|---|")
    print(
        f"| (a) 16 images, DDIM 50: end to end vs direct Sampler call | {direct:.2f} s | {e2e:.2f} s | {e2e / direct:.2f}x | <= 1.10x |"
    )
    print(
        f"| (b) POST /v1/jobs, {args.clients} clients, {args.requests} requests | - | {rate:.0f} jobs/s, p50 {p50:.1f} ms, p99 {p99:.1f} ms, {errors} errors | - | >= 300 jobs/s |"
    )
    print(
        f"| (c) 16 one-image jobs: one after another vs concurrent | {seq:.2f} s | {conc:.2f} s | {seq / conc:.2f}x faster | > 1x |"
    )


if __name__ == "__main__":
    main()
