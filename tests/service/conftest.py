"""The real servers for the service tests, each started once per session by the first test that
asks for it: a Redis-compatible server (redis_server), SeaweedFS (s3_server) and the Serve
application on both (stack, service.dev.stack.local_stack), serving the models in model_dir: the
demo model and a tiny RGB latent model."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from service.api_keys import digest
from service.dev.servers import RedisServer, S3Server, free_port
from service.settings import REPO_ROOT, Settings

KEY_A, KEY_B = "test-key-alice", "test-key-bob"
KEY_CAROL_OLD, KEY_CAROL_NEW = "test-key-carol-2025", "test-key-carol-2026"  # one owner, two keys
S3_KEY, S3_SECRET = "testaccess", "testsecret-0123456789"


@dataclass
class Stack:
    redis: RedisServer
    s3: S3Server
    settings: Settings
    base_url: str
    metrics_url: str

    def client(self, key: str | None = KEY_A) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=30)


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@pytest.fixture
def run():
    """Run a coroutine on a fresh event loop (one per test, as redis.asyncio clients need)."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


# The servers are session fixtures, started by the first test that asks for one (and only then:
# tests/conftest.py marks every test that needs one `integration`, so `-m "not integration"`
# starts none).
@pytest.fixture(scope="session")
def redis_server(tmp_path_factory) -> RedisServer:
    """A real Redis-compatible server for the session (the stack uses database 0)."""
    with RedisServer(tmp_path_factory.mktemp("redis")).start() as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """SeaweedFS's S3 gateway for the session, with the tests' identity (S3_KEY, S3_SECRET)."""
    with S3Server(tmp_path_factory.mktemp("s3"), access_key=S3_KEY, secret_key=S3_SECRET).start() as server:
        yield server


STACK_SETTINGS = {
    "s3_bucket": "undiffuse-test",
    "api_keys": [
        KEY_A,  # plain keys (development): owner id = the first 24 hex digits of the key's hash
        f"sha256:{digest(KEY_B)}",  # the same owner id, from the hash alone
        f"carol=sha256:{digest(KEY_CAROL_OLD)}",
        f"carol=sha256:{digest(KEY_CAROL_NEW)}",
    ],
    "max_images_per_job": 64,
    "shard_size": 4,
    "visibility_timeout_seconds": 6.0,
    "max_attempts": 2,
    "torch_threads": 1,
    "redis_timeout_seconds": 1.0,
    "webhook_allow_private": True,  # the tests' receivers listen on 127.0.0.1
    "webhook_retry_base_seconds": 0.2,
    "max_reads_per_minute_per_key": 100_000,  # the tests poll from many threads; the quota has its own test
}


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The stack's models: `mnist`, the demo model (a link to models/mnist; the default model,
    Settings.default_model), and `faces`, a tiny LDM pipeline as diffusers saves it (a UNet on
    VQModel latents, decoded to 16x16 RGB; random weights, nothing downloaded)."""
    from tests.core.test_latent_models import _ldm

    folder = tmp_path_factory.mktemp("models")
    (folder / "mnist").symlink_to(REPO_ROOT / "models" / "mnist")
    _ldm(folder / "faces")
    return folder


def stack_settings(redis: RedisServer, s3: S3Server, model_dir: Path) -> Settings:
    """The settings the stack runs with, on these servers and models (the model_dir fixture)."""
    from service.dev.stack import LocalServers

    return Settings(
        **{
            "environment": "development",
            **LocalServers(redis, s3).settings(),
            **STACK_SETTINGS,
            "model_dir": str(model_dir),
        }
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory, redis_server, s3_server, model_dir) -> Stack:
    """The Serve application on the session's servers and models, in a local Ray of its own."""
    from service.dev.stack import local_stack

    with local_stack(
        tmp_path_factory.mktemp("stack"),
        {**STACK_SETTINGS, "model_dir": str(model_dir)},
        redis=redis_server,
        s3=s3_server,
        num_cpus=6,
        ray_options={"_system_config": {"metrics_report_interval_ms": 500}},
        worker_replicas=2,
        max_batch_images=16,
        log_encoding="JSON",
    ) as running:
        yield Stack(running.redis, running.s3, Settings(**running.settings), running.base_url, running.metrics_url)


def wait_idle(stack: Stack, timeout: float = 120) -> None:
    """Until no shard is queued or in flight (settled shards leave the queue)."""
    import redis

    from service.jobs.queue import totals

    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    wait_for(lambda: totals(client).shards == 0, timeout, 0.2, "the queue to drain")


@pytest.fixture
def api(stack) -> httpx.Client:
    with stack.client() as c:
        yield c


def wait_for_status(client: httpx.Client, job_id: str, statuses: set[str], timeout: float = 120) -> dict:
    def check():
        body = client.get(f"/v1/jobs/{job_id}").json()
        return body if body["status"] in statuses else None

    return wait_for(check, timeout, 0.25, f"job {job_id} to reach {statuses}")


def enqueue_unrunnable_job(stack: Stack) -> str:
    """A job of Alice's that the Denoiser cannot run (more steps than the model has, which the
    API would refuse), written straight to Redis: its shard fails every attempt."""
    import asyncio

    from service.jobs.records import JobParams
    from service.jobs.store import JobStore

    async def enqueue() -> str:
        store = JobStore.from_url(stack.redis.url, 3600, stack.settings.shard_size)
        params = JobParams(
            model="mnist", num_images=2, steps=5000, sampler="ddim", eta=0.0, seed=1, class_label=1, guidance_scale=1.0
        )
        owner = digest(KEY_A)[:24]  # the owner id of a plain key (service.api_keys)
        job_id, _, _ = await store.submit(owner, params, {"unrunnable": True})
        await store.close()
        return job_id

    return asyncio.run(enqueue())


def scrape(stack: Stack) -> list:
    """The metrics endpoint, parsed by prometheus-client's exposition parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return list(text_string_to_metric_families(httpx.get(stack.metrics_url, timeout=10).text))


def sample_sum(families: list, sample: str, **labels: str) -> float:
    """The sum of every sample named `sample` (e.g. foo_count) whose labels include `labels`."""
    return sum(
        s.value
        for family in families
        for s in family.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    )


def sample_names(families: list) -> set[str]:
    return {s.name for family in families for s in family.samples}


@pytest.fixture
def asgi_api(redis_server, s3_server, model_dir):
    """A factory of in-process API clients: the ingress's FastAPI app with the stack's settings
    and its own overrides, on the real Redis (database 6, which no Worker reads, so submitted jobs
    never run) and the real S3-compatible server, without Ray. For what the Serve stack's fixed
    settings cannot show (small quotas) and for generated-request testing."""
    import asyncio

    from fastapi.testclient import TestClient

    from service.api.deps import build_context, set_context
    from service.api.fastapi_app import app

    url = redis_server.url.rsplit("/", 1)[0] + "/6"
    base = stack_settings(redis_server, s3_server, model_dir)
    clients = []

    def make(**overrides) -> TestClient:
        settings = Settings(
            **{
                **base.model_dump(),
                "s3_secret_access_key": S3_SECRET,
                "redis_url": url,
                **overrides,
            }
        )
        set_context(build_context(settings, denoiser=None, listeners=[]))  # no Ray: no metrics
        client = TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {KEY_A}"})
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
    import redis

    redis.Redis.from_url(url).flushdb()
    asyncio.set_event_loop(None)


@pytest.fixture
def live_api(asgi_api):
    """The in-process API (as asgi_api makes it, default settings) served over real HTTP by
    uvicorn in a thread: one event loop for every request. Yields its base URL."""
    import threading

    import uvicorn

    from service.api.fastapi_app import app

    asgi_api()  # sets the context (database 6: submitted jobs never run)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 20, 0.05, "uvicorn to start")
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
