"""The whole stack on one machine: `python -m service.dev.local` (what `make up` runs).

Starts a Redis-compatible server and SeaweedFS's S3 gateway on 127.0.0.1 (state under .run/),
local Ray, and the Serve application serving the demo model on http://127.0.0.1:8000.
Prints an API key for this run. Ctrl-C stops all of it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

from service.dev.servers import RedisServer, S3Server
from service.keys import digest
from service.settings import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.dev.local", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus endpoint of Ray's metrics agent")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / ".run", help="state of Redis and SeaweedFS")
    p.add_argument("--api-key", default=None, help="default: a new random key each start")
    p.add_argument("--denoiser-replicas", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)

    api_key = args.api_key or "ud_" + secrets.token_urlsafe(24)
    s3_secret = secrets.token_urlsafe(24)
    with (
        RedisServer(args.workdir / "redis").start() as redis,
        S3Server(args.workdir / "seaweedfs", access_key="undiffuse", secret_key=s3_secret).start() as s3,
    ):
        _serve(args, api_key, s3_secret, redis, s3)
    return 0


def _serve(args: argparse.Namespace, api_key: str, s3_secret: str, redis: RedisServer, s3: S3Server) -> None:
    base = f"http://127.0.0.1:{args.port}"
    banner = f"""
undiffuse is up.
  API          {base}   (OpenAPI docs: {base}/docs)
  API key      {api_key}
  metrics      http://127.0.0.1:{args.metrics_port}/metrics   (names start with ray_undiffuse_)
  Redis        {redis.url}
  S3           {s3.endpoint}   bucket: undiffuse

Try:
  export KEY={api_key}
  curl -s -X POST {base}/v1/jobs -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
       -d '{{"num_images": 4, "class_label": 7, "steps": 50}}'

Ctrl-C stops everything."""
    from service.app import AppArgs, build_app
    from service.run import serve_until_stopped

    app_args = AppArgs(
        denoiser_replicas=args.denoiser_replicas,
        worker_replicas=args.workers,
        settings={
            "redis_url": redis.url,
            "s3_endpoint_url": s3.endpoint,
            "s3_access_key_id": "undiffuse",
            "s3_secret_access_key": s3_secret,
            "api_keys": [f"local=sha256:{digest(api_key)}"],  # configuration holds hashes only
        },
    )
    serve_until_stopped(build_app(app_args), app_args.cpus_needed(), "127.0.0.1", args.port, args.metrics_port, banner)


if __name__ == "__main__":
    sys.exit(main())
