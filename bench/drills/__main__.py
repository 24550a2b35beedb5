"""Fault drills against a local stack that they start (service.dev.stack: a Redis-compatible server
with AOF, SeaweedFS, a new local Ray with Serve): load with replica kills, a Redis kill -9 and
restart from its AOF, an S3 outage, and hostile requests; then every job's images are counted and
decoded. Prints one table of outcomes and exits 1 if any target is missed. See docs/reliability.md.

    python -m bench.drills                 # 1,000 jobs, 5 + 5 replica kills, a 60 s S3 outage
    python -m bench.drills --short         # the CI size: 100 jobs, 2 + 2 kills, a 20 s outage
    python -m bench.drills --short --json results.json
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict
from pathlib import Path

from bench.drills.hostile import hostile
from bench.drills.kills import load_with_kills
from bench.drills.load import BUCKET, FULL, KEYS, ROOT, S3_KEY, S3_SECRET, SHORT, Monitor, Recorder, Size, log
from bench.drills.outages import outage_under_load, redis_away, redis_gap_report, s3_away, s3_outage_report
from bench.drills.report import five_hundreds, info_rows, print_table, targets
from bench.drills.verify import verify
from service.dev.stack import LocalStack, local_stack


def start_stack(work: Path, size: Size) -> AbstractContextManager[LocalStack]:
    """One Denoiser and one Worker replica on 4 CPUs, per-key quotas far above what the drill's
    clients reach, and a visibility timeout short enough that a killed Worker's shards are
    reclaimed within the drill."""
    settings = {
        "s3_bucket": BUCKET,
        "api_keys": [KEYS["A"], KEYS["B"]],
        "model_dir": str(ROOT / "models"),
        "shard_size": size.shard_size,
        "visibility_timeout_seconds": 10.0,
        "max_attempts": 3,
        "torch_threads": 1,
        "max_jobs_in_flight_per_key": 10_000,
        "max_submissions_per_minute_per_key": 100_000,
    }
    return local_stack(
        work,
        settings,
        s3_credentials=(S3_KEY, S3_SECRET),
        num_cpus=4,
        ray_options={"logging_level": "ERROR", "log_to_driver": False},
        denoiser_replicas=1,
        worker_replicas=1,
    )


def run(size: Size, seed: int, label: str) -> dict:
    rng = random.Random(seed)
    rec = Recorder()
    work = Path(tempfile.mkdtemp(prefix="undiffuse-drills-"))
    result: dict = {"config": {"size": label, "seed": seed, **asdict(size)}}
    log(f"starting the stack in {work}")
    with start_stack(work, size) as stack:
        result["config"]["settings"] = {
            k: v for k, v in stack.settings.items() if "secret" not in k and k != "api_keys"
        }
        monitor = Monitor(rec, stack.redis.url)
        monitor.start()
        log(f"phase 1: {size.jobs} jobs from {size.clients} clients, {size.kills} + {size.kills} replica kills")
        rec.phase = "load+kills"
        jobs, result["load_with_kills"] = load_with_kills(stack, rec, monitor, size, rng)
        log(f"phase 2: {size.outage_jobs} jobs, Redis kill -9 and restart")
        rec.phase = "redis"
        more, window = outage_under_load(
            stack, rec, monitor, size, rng, "redis", lambda: redis_away(stack, rec, size.redis_gap_s)
        )
        jobs += more
        result["redis"] = redis_gap_report(rec, window)
        log(f"phase 3: {size.outage_jobs} jobs, S3 down for {size.s3_outage_s:g} s")
        rec.phase = "s3"
        more, window = outage_under_load(stack, rec, monitor, size, rng, "s3", lambda: s3_away(stack, rec, size, rng))
        jobs += more
        result["s3"] = s3_outage_report(rec, window)
        monitor.stopping.set()
        log("phase 4: 100 hostile requests")
        rec.phase = "hostile"
        result["hostile"] = hostile(stack, jobs)
        log("verifying every job's images")
        result["verification"] = verify(stack, jobs, set(result["hostile"]["jobs_created"]))
        result["http"] = five_hundreds(rec, (result["redis"]["killed_at_s"], result["redis"].pop("gap_end_s")))
    result["targets"] = targets(result)
    result["info"] = info_rows(result)
    result["ok"] = all(ok for *_, ok in result["targets"])
    result["wall_s"] = round(rec.now(), 1)
    if result["ok"]:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"kept {work} (server logs)")
    return result


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.drills", description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="the CI size (100 jobs, 2 + 2 kills, a 20 s S3 outage)")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--seed", type=int, default=None, help="for the job mix and the kill moments")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    result = run(SHORT if args.short else FULL, seed, "short" if args.short else "full")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    print_table(result)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
