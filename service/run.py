"""Run the application in a container against external Redis and S3 (what the Docker image and
the compose stack start): a single-node Ray head with the Serve app on 0.0.0.0:8000 and Ray's
metrics on 0.0.0.0:8080. On Kubernetes the RayService deploys the app instead.

    python -m service.run [--denoiser-num-gpus 1] [--denoiser-replicas 1] [--workers 1]
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.run", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--metrics-port", type=int, default=8080)
    p.add_argument("--denoiser-replicas", type=int, default=1)
    p.add_argument("--denoiser-num-gpus", type=float, default=0.0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--log-encoding", choices=("TEXT", "JSON"), default="TEXT", help="JSON: structured log files")
    args = p.parse_args(argv)

    from service.app import AppArgs, build_app

    app_args = AppArgs(
        denoiser_replicas=args.denoiser_replicas,
        denoiser_num_gpus=args.denoiser_num_gpus,
        worker_replicas=args.workers,
        log_encoding=args.log_encoding,
    )
    app = build_app(app_args)  # validates Settings from the environment before Ray starts
    serve_until_stopped(
        app,
        app_args.cpus_needed(),
        args.host,
        args.port,
        args.metrics_port,
        f"undiffuse serving on http://{args.host}:{args.port}",
    )
    return 0


def ray_cpus(cpus_needed: float, detected: float | None = None) -> int | None:
    """Logical CPUs for a single-node Ray: None (Ray's own count, which honours a container's
    CPU limit) unless that is fewer than the application's replicas reserve; then that many (on
    a 1-core machine or container the replicas would otherwise never start)."""
    if detected is None:
        from ray._private.utils import get_num_cpus

        detected = get_num_cpus()
    return None if detected >= cpus_needed else math.ceil(cpus_needed)


def serve_until_stopped(app, cpus_needed: float, host: str, port: int, metrics_port: int, banner: str) -> None:
    """Start local Ray (ray_cpus(cpus_needed) CPUs) and Serve, run the application, print banner,
    and block until SIGINT or SIGTERM; then shut Serve and Ray down."""
    import ray
    from ray import serve

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(num_cpus=ray_cpus(cpus_needed), include_dashboard=False, _metrics_export_port=metrics_port)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(app, name="undiffuse", route_prefix="/")
        print(banner, flush=True)
        stop.wait()
    finally:
        print("stopping...", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
