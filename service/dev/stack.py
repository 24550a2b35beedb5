"""The whole stack on this machine, started one way for everyone who needs it: `python3 dev.py up`
(service.dev.local), the integration tests, the benchmarks and the fault drills.

    with local_stack(tmp, settings={"api_keys": [key]}) as stack:
        httpx.get(stack.base_url + "/healthz")

`local_servers()` starts the Redis-compatible server and SeaweedFS's S3 gateway (what the image
test runs a container against); `local_stack()` adds a new local Ray with the Serve application on
top of them. Every port is a free one unless given, every server is bound to 127.0.0.1, and
leaving the block stops Serve, then Ray, then the servers it started.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.dev.servers import RedisServer, S3Server, free_port

APP_NAME = "undiffuse"


@dataclass
class LocalServers:
    redis: RedisServer
    s3: S3Server

    def settings(self) -> dict[str, Any]:
        """The UNDIFFUSE_* settings that point the service at these servers."""
        return {
            "redis_url": self.redis.url,
            "s3_endpoint_url": self.s3.endpoint,
            "s3_access_key_id": self.s3.access_key,
            "s3_secret_access_key": self.s3.secret_key,
        }


@dataclass
class LocalStack:
    redis: RedisServer
    s3: S3Server
    settings: dict[str, Any]  # every UNDIFFUSE_* override the application runs with (secrets too)
    base_url: str
    metrics_url: str  # Ray's metrics agent: the application's Prometheus metrics
    app_args: Any = field(repr=False)  # service.app.AppArgs


@contextmanager
def local_servers(
    workdir: Path,
    s3_credentials: tuple[str, str] | None = None,
    redis: RedisServer | None = None,
    s3: S3Server | None = None,
) -> Iterator[LocalServers]:
    """A Redis-compatible server (state in workdir/redis) and SeaweedFS (workdir/seaweedfs) with
    one identity: `s3_credentials` (access key, secret), by default "undiffuse" and a new random
    secret. A server passed in (`redis`, `s3`) is used instead, and left running."""
    access_key, secret_key = s3_credentials or ("undiffuse", secrets.token_urlsafe(24))
    workdir = Path(workdir)
    with ExitStack() as started:
        if redis is None:
            redis = started.enter_context(RedisServer(workdir / "redis").start())
        if s3 is None:
            s3 = started.enter_context(
                S3Server(workdir / "seaweedfs", access_key=access_key, secret_key=secret_key).start()
            )
        yield LocalServers(redis, s3)


@contextmanager
def local_stack(
    workdir: Path,
    settings: dict[str, Any] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    metrics_port: int | None = None,
    num_cpus: int | None = None,
    s3_credentials: tuple[str, str] | None = None,
    redis: RedisServer | None = None,
    s3: S3Server | None = None,
    ray_options: dict[str, Any] | None = None,
    **app_args: Any,
) -> Iterator[LocalStack]:
    """local_servers(), then a new local Ray (never one that happens to run on this machine) with
    the application on http://host:port. `settings` are UNDIFFUSE_* overrides on top of the ones
    that reach the servers and environment "development"; `app_args` are service.app.AppArgs
    fields (denoiser_replicas, worker_replicas, max_batch_images, log_encoding, ...);
    `ray_options` more arguments of ray.init. Ray gets `num_cpus` CPUs, by default its own count,
    raised to what the replicas reserve (service.run.ray_cpus)."""
    import ray
    from ray import serve

    from service.app import AppArgs, build_app
    from service.run import ray_cpus

    port = port or free_port()
    metrics_port = metrics_port or free_port()
    with local_servers(workdir, s3_credentials, redis, s3) as servers:
        overrides = {"environment": "development", **servers.settings(), **(settings or {})}
        args = AppArgs(**app_args, settings=overrides)
        app = build_app(args)  # refuses bad settings before Ray starts
        ray.init(
            address="local",
            num_cpus=num_cpus or ray_cpus(args.cpus_needed()),
            include_dashboard=False,
            _metrics_export_port=metrics_port,
            **(ray_options or {}),
        )
        try:
            serve.start(http_options={"host": host, "port": port})
            serve.run(app, name=APP_NAME, route_prefix="/")
            yield LocalStack(
                servers.redis,
                servers.s3,
                overrides,
                f"http://{host}:{port}",
                f"http://{host}:{metrics_port}/metrics",
                args,
            )
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
