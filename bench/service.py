"""Service benchmarks, each side by side against its reference in one run, on a local stack
(Redis-compatible server, SeaweedFS, Ray Serve) started by this script:

  (a) overhead: a 16-image DDIM-50 job end to end over HTTP (queue, worker, PNG, S3) against
      a direct call of the Denoiser deployment for the same 16 images -> ratio (goal <= 1.10);
  (b) POST /v1/jobs throughput and p50/p99 latency with 32 concurrent clients (goal >= 300/s),
      against GET /healthz through the same proxy; load from wrk when installed, else httpx;
  (c) 16 concurrent one-image jobs against the same 16 run one after another -> batching gain;
  (d) the Denoiser's step gaps (undiffuse_engine_step_gap_seconds: host time between one step and
      the next while work continues) during a long job, with a storm of one-image submissions
      (--requests, --clients) against the same job without one -> how much a busy replica's event
      loop delays the next step.

    python bench/service.py [--requests 2000] [--clients 32]

The stack runs with the per-key quotas lifted (submissions per minute, jobs and cost in flight,
cost per day): the storms measure the path a job takes, not the quotas, which have their own
tests and bench/admission.py.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # run as `python bench/service.py`: this file must not shadow the package
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench-key"


class Jobs:
    """Submits over HTTP; watches completion in the job record in Redis (what GET /v1/jobs/{id}
    reads), so that polling does not load the 2-core machine's HTTP proxy."""

    def __init__(self, client: httpx.AsyncClient, redis_url: str) -> None:
        from service.jobs.connection import async_redis

        self.client = client
        self.redis = async_redis(redis_url, 5.0)

    async def run(self, body: dict) -> float:
        from service.jobs import redis_keys

        start = time.perf_counter()
        r = await self.client.post("/v1/jobs", json=body)
        r.raise_for_status()
        key = redis_keys.job(r.json()["id"])
        while (status := await self.redis.hget(key, "status")) in ("queued", "running"):
            await asyncio.sleep(0.005)
        assert status == "succeeded", status
        return time.perf_counter() - start


def engine_alone(repeats: int) -> float:
    """The same 16 images through a DenoisingEngine in this process (no Serve, no Redis, no S3):
    median seconds, pixels on the host included."""
    import torch

    from undiffuse import load_model
    from undiffuse.engine import DenoisingEngine, EngineConfig, Request

    torch.set_num_threads(1)  # what one Denoiser replica gets here (num_cpus=1)
    engine = DenoisingEngine(load_model(ROOT / "models" / "mnist"), EngineConfig(max_batch=64, compile=False))
    labels = list(range(10)) + list(range(6))
    times = []
    for k in range(repeats + 1):
        t = time.perf_counter()
        engine.add(Request(k, "bench", seed=0, start=0, count=16, steps=50, labels=labels))
        done = []
        while not engine.idle:
            done += engine.step()
        done[0].pixels()
        times.append(time.perf_counter() - t)
    return statistics.median(times[1:])


async def overhead(jobs: Jobs, denoiser, repeats: int) -> tuple[float, float]:
    from service.jobs import redis_keys
    from service.jobs.records import JobParams, ShardTask

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
    # a running job's record for the direct shard: the Denoiser cancels a shard whose job it does
    # not find (or finds stopped) when it records progress
    await jobs.redis.hset(redis_keys.job(task.job_id), mapping={"status": "running", "owner": "bench"})
    await denoiser.generate.remote(task)  # warm up both paths
    await jobs.run(body)
    direct, e2e = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        result = await denoiser.generate.remote(task)
        direct.append(time.perf_counter() - t)
        assert not result.canceled, "the direct shard was canceled"
        e2e.append(await jobs.run(body))
    await jobs.redis.delete(redis_keys.job(task.job_id))
    return statistics.median(direct), statistics.median(e2e)


async def request_storm(
    base_url: str, requests: int, clients: int, method: str, path: str, body: dict | None
) -> tuple[float, float, float, int]:
    """requests calls by `clients` concurrent clients: (per second, p50 ms, p99 ms, errors)."""
    latencies: list[float] = []
    errors = 0
    ok = 202 if method == "POST" else 200
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=30) as c:
        remaining = requests

        async def client_loop():
            nonlocal errors, remaining
            while remaining > 0:
                remaining -= 1
                t = time.perf_counter()
                try:
                    r = await c.request(method, path, json=body)
                except httpx.TimeoutException:  # an answer slower than the client's 30 s: an error
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - t)
                errors += r.status_code != ok

        start = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        wall = time.perf_counter() - start
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return requests / wall, p(0.50), p(0.99), errors


def wrk_storm(
    base_url: str, seconds: int, clients: int, method: str, path: str, body: dict | None
) -> tuple[float, float, float, int]:
    """The same measurement with wrk (C, epoll): a load generator that leaves the 2 cores to the
    server. (per second, p50 ms, p99 ms, non-2xx responses)."""
    import json
    import re
    import subprocess

    script = Path(tempfile.mkstemp(suffix=".lua")[1])
    lines = [f'wrk.method = "{method}"', f'wrk.headers["Authorization"] = "Bearer {KEY}"']
    if body is not None:
        lines += [f"wrk.body = '{json.dumps(body)}'", 'wrk.headers["Content-Type"] = "application/json"']
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{seconds}s", "--latency", "-s", str(script), base_url + path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout

    def ms(label: str) -> float:
        found = re.search(rf"^\s+{label}\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        if found is None:
            raise RuntimeError(f"no {label} latency in wrk's output:\n{out}")
        value, unit = found.groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, ms("50%"), ms("99%"), int(bad.group(1)) if bad else 0


async def batching(jobs: Jobs, n: int = 16) -> tuple[float, float]:
    body = {"num_images": 1, "steps": 50, "sampler": "ddim", "class_label": 3}
    start = time.perf_counter()
    for _ in range(n):
        await jobs.run(body)
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    await asyncio.gather(*(jobs.run(body) for _ in range(n)))
    concurrent = time.perf_counter() - start
    return sequential, concurrent


def gap_histogram(metrics_url: str) -> dict[float, float]:
    """{upper bound: cumulative count} of undiffuse_engine_step_gap_seconds, and -1: the sum."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(httpx.get(metrics_url, timeout=10).text):
        for s in family.samples:
            if s.name.endswith("undiffuse_engine_step_gap_seconds_bucket"):
                le = float(s.labels["le"])
                out[le] = out.get(le, 0.0) + s.value
            elif s.name.endswith("undiffuse_engine_step_gap_seconds_sum"):
                out[-1.0] = out.get(-1.0, 0.0) + s.value
    return out


def gap_summary(before: dict[float, float], after: dict[float, float]) -> str:
    """The gaps recorded between two scrapes: count, mean, and the bucket holding p50 and p99."""
    bounds = sorted(b for b in after if b >= 0)
    counts = [after[b] - before.get(b, 0.0) for b in bounds]
    n = counts[-1] if counts else 0.0
    if n <= 0:
        return "no gaps recorded"
    mean = (after[-1.0] - before.get(-1.0, 0.0)) / n
    quantile = lambda q: next(b for b, c in zip(bounds, counts, strict=True) if c >= q * n)  # noqa: E731
    fmt = lambda b: "> 100 ms" if b == float("inf") else f"<= {b * 1e3:g} ms"  # noqa: E731
    return f"{n:.0f} gaps, mean {mean * 1e3:.2f} ms, p50 {fmt(quantile(0.5))}, p99 {fmt(quantile(0.99))}"


async def step_gaps(jobs: Jobs, base_url: str, metrics_url: str, requests: int, clients: int) -> tuple[str, str]:
    """(d): the step gaps of a long job alone, then beside a submission storm."""
    r = await jobs.client.post("/v1/jobs", json={"num_images": 16, "steps": 1000, "class_label": 3})
    r.raise_for_status()
    await asyncio.sleep(8)  # running, and its first gaps exported
    quiet0 = gap_histogram(metrics_url)
    await asyncio.sleep(8)
    await asyncio.sleep(1.5)  # the metrics agent's export interval (0.5 s) and the progress interval
    quiet1 = busy0 = gap_histogram(metrics_url)
    body = {"num_images": 1, "steps": 2, "class_label": 0}
    await request_storm(base_url, requests, clients, "POST", "/v1/jobs", body)
    await asyncio.sleep(1.5)
    busy1 = gap_histogram(metrics_url)
    await jobs.client.post(f"/v1/jobs/{r.json()['id']}/cancel")
    return gap_summary(quiet0, quiet1), gap_summary(busy0, busy1)


async def drain(redis_url: str) -> None:
    from service.jobs.connection import async_redis
    from service.jobs.queue import ShardQueue

    r = async_redis(redis_url, 2.0)
    while await ShardQueue(r).depth():
        await asyncio.sleep(0.2)
    await r.aclose()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--seconds", type=int, default=15, help="duration of each wrk run (b)")
    p.add_argument("--only", default="abcd", help="the benchmarks to run, e.g. --only d (default abcd)")
    p.add_argument("--settings", default="{}", help="UNDIFFUSE_* overrides for the stack, JSON")
    args = p.parse_args()

    from ray import serve

    from service.dev.stack import local_stack

    work = Path(tempfile.mkdtemp(prefix="undiffuse-bench-"))
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    ray_options = {**quiet, "_system_config": {"metrics_report_interval_ms": 500}}
    # the per-key quotas are lifted: these storms measure the path a job takes, not the quotas
    unlimited = {
        "max_submissions_per_minute_per_key": 10**9,
        "max_jobs_in_flight_per_key": 10**6,
        "max_cost_in_flight_per_key": 10**12,
        "max_cost_per_day_per_key": 10**12,
    }
    results: dict[str, object] = {}
    overrides = {"api_keys": [KEY], **unlimited, **json.loads(args.settings)}
    with local_stack(work, overrides, ray_options=ray_options) as stack:
        denoiser = serve.get_deployment_handle("Denoiser", app_name="undiffuse")
        base, redis_url = stack.base_url, stack.redis.url
        headers = {"Authorization": f"Bearer {KEY}"}

        async def all_benchmarks():
            async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as c:
                jobs = Jobs(c, redis_url)
                if "a" in args.only:
                    results["a"] = await overhead(jobs, denoiser, args.repeats)
                if "c" in args.only:
                    results["c"] = await batching(jobs)
            if "b" in args.only:
                body = {"num_images": 1, "steps": 1, "class_label": 0}
                if shutil.which("wrk"):
                    floor = wrk_storm(base, args.seconds, args.clients, "GET", "/healthz", None)
                    await drain(redis_url)
                    submit = wrk_storm(base, args.seconds, args.clients, "POST", "/v1/jobs", body)
                else:
                    floor = await request_storm(base, args.requests, args.clients, "GET", "/healthz", None)
                    submit = await request_storm(base, args.requests, args.clients, "POST", "/v1/jobs", body)
                results["b"] = (floor, submit)
                await drain(redis_url)
            if "d" in args.only:
                async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120) as c:
                    storm = min(args.requests, 500)
                    results["d"] = await step_gaps(Jobs(c, redis_url), base, stack.metrics_url, storm, args.clients)
                await drain(redis_url)

        asyncio.run(all_benchmarks())
        alone = engine_alone(args.repeats) if "a" in args.only else 0.0

    print(
        f"# {platform.node()} {platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}"
    )
    print("| benchmark | reference | undiffuse | ratio | goal |")
    print("|---|---|---|---|---|")
    if "a" in results:
        direct, e2e = results["a"]
        print(
            f"| (a) 16 images, DDIM 50: end to end vs direct Denoiser call | {direct:.2f} s | {e2e:.2f} s | {e2e / direct:.2f}x | <= 1.10x |"
        )
        print(
            f"| (a) the same: end to end vs the engine alone, in-process | {alone:.2f} s | {e2e:.2f} s | {e2e / alone:.2f}x | <= 1.05x |"
        )

    def fmt(r: tuple[float, float, float, int]) -> str:
        return f"{r[0]:.0f}/s, p50 {r[1]:.1f} ms, p99 {r[2]:.1f} ms, {r[3]} errors"

    if "b" in results:
        floor, submit = results["b"]
        print(
            f"| (b) POST /v1/jobs vs GET /healthz (Serve's floor), {args.clients} clients, "
            f"{'wrk ' + str(args.seconds) + ' s each' if shutil.which('wrk') else 'httpx x ' + str(args.requests)} "
            f"| {fmt(floor)} | {fmt(submit)} | {submit[0] / floor[0]:.2f}x | >= 300 jobs/s |"
        )
    if "c" in results:
        seq, conc = results["c"]
        print(
            f"| (c) 16 one-image jobs: one after another vs concurrent | {seq:.2f} s | {conc:.2f} s | {seq / conc:.2f}x faster | > 1x |"
        )
    if "d" in results:
        quiet_gaps, busy_gaps = results["d"]
        print(
            f"| (d) step gaps of a 16-image DDIM 1000 job: alone vs beside {min(args.requests, 500)} one-image "
            f"submissions | {quiet_gaps} | {busy_gaps} | | the device never waits for Python |"
        )


if __name__ == "__main__":
    main()
