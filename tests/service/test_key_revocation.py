"""Keys added and revoked at run time (service.keyring) and how the API takes them
(service.api.deps.get_owner): against the real Redis-compatible server, in its own database,
through the FastAPI app in process, without Ray. The last test runs through the Serve stack."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import httpx
import pytest
import redis

from service import api_keys, keyring
from service.api import deps
from service.api.fastapi_app import app
from service.jobs.store import JobStore
from service.settings import Settings
from service.webhooks import signing

DB = 9
CONFIGURED_KEY = "configured-key-of-alice"
DEAD = "redis://127.0.0.1:1/0"  # nothing listens on port 1


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def url(redis_server) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture
def sync(url) -> redis.Redis:
    client = redis.Redis.from_url(url, decode_responses=True)
    yield client
    client.close()


class Api:
    """The app in process on one context: settings, a job store and a key ring on `url`."""

    def __init__(self, run, url: str, api_keys: list[str], clock: Clock) -> None:
        self.run = run
        self.settings = Settings(redis_url=url, api_keys=api_keys, redis_timeout_seconds=0.5)
        self.store = JobStore.from_url(url, 600, 4, timeout=0.5)
        self.ring = keyring.KeyRing(self.store.r, clock=clock)
        self.context = deps.Context(
            settings=self.settings,
            store=self.store,
            lifecycle=None,
            objects=None,
            registry=None,
            denoiser=None,
            keyring=self.ring,
        )  # type: ignore[arg-type]

    def get(self, key: str | None, path: str = "/v1/webhook-secret") -> httpx.Response:
        async def get() -> httpx.Response:
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return await client.get(path, headers=headers)

        return self.run(get())

    def owner_of(self, key: str | None) -> str | None:
        """Whose webhook secret the key gets: each owner has its own (development signing key)."""
        r = self.get(key)
        if r.status_code != 200:
            return None
        for owner in ("alice", "bob", deps.ANONYMOUS):
            if r.json()["secret"] == signing.owner_secrets(self.settings.webhooks, owner)[0]:
                return owner
        raise AssertionError("a secret of no known owner")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def make_api(run, url, clock, monkeypatch):
    apis = []

    def make(api_keys: list[str] | None = None, redis_url: str | None = None) -> Api:
        api = Api(run, redis_url or url, api_keys or [], clock)
        monkeypatch.setattr(deps, "_context", api.context)
        apis.append(api)
        return api

    yield make
    for api in apis:
        run(api.store.close())


@pytest.fixture
def failures(monkeypatch) -> list[str]:
    """The reasons counted by undiffuse_auth_failures_total, in order."""
    from service import metrics

    counted: list[str] = []

    class Counter:
        def inc(self, value: float = 1.0, tags: dict | None = None) -> None:
            counted.append(tags["reason"])

    monkeypatch.setattr(metrics, "auth_failures_total", lambda: Counter())
    return counted


def configured_entry(owner: str, key: str) -> str:
    return f"{owner}=sha256:{api_keys.digest(key)}"


# --- the key ring --------------------------------------------------------------------------------


def test_added_keys_are_stored_as_digests_and_listed_without_the_key(sync):
    key, digest = keyring.add(sync, "alice", now=1_700_000_000)
    assert key.startswith("ud_") and digest == api_keys.digest(key)
    stored = json.dumps(sync.hgetall(keyring.KEYS))
    assert key not in stored and digest in stored
    [entry] = keyring.entries(sync, {})
    assert (entry.owner, entry.source, entry.created_at, entry.revoked_at) == ("alice", "redis", 1_700_000_000, None)
    with pytest.raises(ValueError, match="owner must match"):
        keyring.add(sync, "bad owner")


def test_revoking_marks_the_key_and_configured_keys_can_be_revoked_too(sync):
    _, digest = keyring.add(sync, "alice")
    configured = {api_keys.digest(CONFIGURED_KEY): "bob"}
    assert keyring.revoke(sync, digest, "alice", now=1_700_000_100)
    assert not keyring.revoke(sync, digest, "alice")  # once
    assert keyring.revoke(sync, api_keys.digest(CONFIGURED_KEY), "bob")
    by_digest = {e.digest: e for e in keyring.entries(sync, configured)}
    assert by_digest[digest].revoked_at == 1_700_000_100 and by_digest[digest].source == "redis"
    assert by_digest[api_keys.digest(CONFIGURED_KEY)].source == "config"
    assert by_digest[api_keys.digest(CONFIGURED_KEY)].revoked_at is not None


def test_a_prefix_names_one_key(sync):
    known = [
        keyring.Entry("ab" * 32, "a", "redis", 1.0, None),
        keyring.Entry("abcd" + "0" * 60, "b", "redis", 2.0, None),
    ]
    assert keyring.resolve("sha256:" + "ab" * 6, known) == "ab" * 32
    with pytest.raises(ValueError, match="2 keys' digests start with abababab: give more"):
        keyring.resolve("abababab", known + [keyring.Entry("ab" * 5 + "1" * 54, "c", "redis", 3.0, None)])
    with pytest.raises(ValueError, match="at least 8 hex digits"):
        keyring.resolve("abcd", known)
    with pytest.raises(ValueError, match="no key's digest starts with 12345678"):
        keyring.resolve("12345678", known)
    # a full digest the command does not know (configuration it cannot see) stands for itself
    assert keyring.resolve("12" * 32, known) == "12" * 32


def test_a_replica_reads_the_ring_at_most_once_a_second(run, url, sync, clock):
    client = JobStore.from_url(url, 600, 4).r
    reads: list[str] = []
    real_get, real_pipeline = client.get, client.pipeline

    async def counted_get(name):
        reads.append("version")
        return await real_get(name)

    def counted_pipeline(*args, **kwargs):
        reads.append("hashes")
        return real_pipeline(*args, **kwargs)

    client.get, client.pipeline = counted_get, counted_pipeline
    ring = keyring.KeyRing(client, clock=clock)
    try:
        assert run(ring.snapshot()).empty and reads == ["hashes"]
        _, digest = keyring.add(sync, "alice")
        clock.now += 0.9
        assert run(ring.snapshot()).empty and reads == ["hashes"]  # within the second: the copy
        clock.now += 0.2
        assert run(ring.snapshot()).owners == {digest: "alice"} and reads == ["hashes", "version", "hashes"]
        clock.now += 1.1
        run(ring.snapshot())  # nothing changed: the version alone
        assert reads == ["hashes", "version", "hashes", "version"]

        async def burst():
            clock.now += 1.1
            await asyncio.gather(*(ring.snapshot() for _ in range(20)))

        run(burst())  # 20 requests at once after the second: one check
        assert reads[4:] == ["version"]
        sync.hdel(keyring.KEYS, digest)  # by hand, without the version: seen at the next full read
        clock.now += keyring.RELOAD_SECONDS
        assert run(ring.snapshot()).empty
    finally:
        run(client.aclose())


# --- get_owner -----------------------------------------------------------------------------------


def test_keys_from_configuration_and_the_ring_are_accepted_and_share_owners(make_api, sync, clock):
    api = make_api([configured_entry("alice", CONFIGURED_KEY)])
    key, _ = keyring.add(sync, "alice")
    bob_key, _ = keyring.add(sync, "bob")
    assert api.owner_of(CONFIGURED_KEY) == "alice"
    assert api.owner_of(key) == "alice"  # the same owner id: the same jobs
    assert api.owner_of(bob_key) == "bob"
    assert api.get("not-a-key").status_code == 401


def test_a_revocation_takes_effect_within_the_refresh_time(make_api, sync, clock, failures):
    api = make_api([configured_entry("alice", CONFIGURED_KEY)])
    key, digest = keyring.add(sync, "bob")
    assert api.owner_of(key) == "bob" and api.owner_of(CONFIGURED_KEY) == "alice"
    keyring.revoke(sync, digest, "bob")
    keyring.revoke(sync, api_keys.digest(CONFIGURED_KEY), "alice")
    assert api.owner_of(key) == "bob"  # the replica's copy is younger than a second
    clock.now += keyring.REFRESH_SECONDS
    for revoked in (key, CONFIGURED_KEY):
        r = api.get(revoked)
        assert r.status_code == 401 and r.json()["detail"] == "API key revoked"
        assert r.headers["www-authenticate"] == "Bearer"
    assert failures == ["revoked", "revoked"]


def test_without_keys_anywhere_there_is_no_auth_and_the_first_key_turns_it_on(make_api, sync, clock):
    api = make_api()
    assert api.owner_of(None) == deps.ANONYMOUS
    key, digest = keyring.add(sync, "alice")
    clock.now += keyring.REFRESH_SECONDS
    assert api.get(None).status_code == 401
    assert api.owner_of(key) == "alice"
    # revoking the only key shuts everyone out: it must not bring back "no auth"
    keyring.revoke(sync, digest, "alice")
    clock.now += keyring.REFRESH_SECONDS
    assert api.get(None).status_code == 401 and api.get(key).status_code == 401


@pytest.mark.parametrize("configured", [[], [configured_entry("alice", CONFIGURED_KEY)]])
def test_redis_down_is_a_503_never_a_pass(make_api, configured):
    """Without the ring a revoked configured key could pass, and without any configured key
    everyone would: the lookup fails, and the app's Redis handler answers 503."""
    api = make_api(configured, redis_url=DEAD)
    for key in (None, CONFIGURED_KEY, "not-a-key"):
        r = api.get(key)
        assert r.status_code == 503, (key, r.text)
        assert r.headers["retry-after"]


def test_failures_are_counted_by_reason_and_logged_without_the_key(make_api, sync, clock, failures, caplog):
    api = make_api([configured_entry("alice", CONFIGURED_KEY)])
    key, digest = keyring.add(sync, "bob")
    keyring.revoke(sync, digest, "bob")
    wrong = "ud_not-a-key-0123456789"
    with caplog.at_level(logging.WARNING, logger="ray.serve"):
        assert api.get(None).status_code == 401
        assert api.get(wrong).status_code == 401
        assert api.get(key).status_code == 401
        assert api.get(CONFIGURED_KEY).status_code == 200
    assert failures == ["missing", "invalid", "revoked"]
    lines = [r.getMessage() for r in caplog.records if r.name == "ray.serve" and r.levelno == logging.WARNING]
    assert len(lines) == 3, lines
    assert "(missing)" in lines[0] and "GET /v1/webhook-secret" in lines[0]
    assert f"(invalid): digest {api_keys.digest(wrong)[:8]}," in lines[1]
    assert f"(revoked): digest {digest[:8]}," in lines[2]
    text = "\n".join(lines)
    assert wrong not in text and key not in text and digest not in text  # 8 digits, not the digest


# --- the command ---------------------------------------------------------------------------------


def test_the_command_adds_lists_and_revokes(url, sync, monkeypatch, capsys):
    monkeypatch.setenv("UNDIFFUSE_REDIS_URL", url)  # the default: the service's configuration
    monkeypatch.setenv("UNDIFFUSE_API_KEYS", configured_entry("carol", CONFIGURED_KEY))
    assert keyring.main(["add", "alice"]) == 0
    out = dict(line.split(":", 1) for line in capsys.readouterr().out.splitlines())
    key = out["key"].strip()
    digest = api_keys.digest(key)
    assert out["digest"].strip() == f"{digest[:12]} (owner alice)"
    assert sync.hexists(keyring.KEYS, digest)

    assert keyring.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert key not in listed and digest not in listed
    rows = {line.split()[0]: line.split() for line in listed.splitlines()[1:]}
    assert rows[digest[:12]][1:3] == ["alice", "redis"] and rows[digest[:12]][-1] == "-"
    assert rows[api_keys.digest(CONFIGURED_KEY)[:12]][1:] == ["carol", "config", "-", "-"]

    assert keyring.main(["revoke", digest[:8]]) == 0
    assert "revoked" in capsys.readouterr().out
    assert keyring.main(["revoke", api_keys.digest(CONFIGURED_KEY)[:10]]) == 0  # a configured key
    capsys.readouterr()
    assert set(sync.hkeys(keyring.REVOKED)) == {digest, api_keys.digest(CONFIGURED_KEY)}
    assert keyring.main(["revoke", digest[:8]]) == 0
    assert "already revoked" in capsys.readouterr().out
    assert keyring.main(["list"]) == 0
    assert all(line.split()[-1].endswith("Z") for line in capsys.readouterr().out.splitlines()[1:])


def test_the_command_refuses_a_short_prefix_and_takes_redis_url(url, sync, monkeypatch, capsys):
    monkeypatch.setenv("UNDIFFUSE_REDIS_URL", DEAD)
    assert keyring.main(["--redis-url", url, "add", "bob"]) == 0  # the flag wins over configuration
    assert sync.hlen(keyring.KEYS) == 1
    with pytest.raises(SystemExit) as info:
        keyring.main(["--redis-url", url, "revoke", "abc"])
    assert info.value.code == 2 and "at least 8 hex digits" in capsys.readouterr().err


# --- through the Serve stack ---------------------------------------------------------------------


@pytest.mark.integration
def test_a_key_added_and_revoked_at_run_time_through_the_stack(stack):
    """The Ingress replicas see the ring within about a second, and the refusals reach the
    Prometheus scrape."""
    from tests.service.conftest import sample_sum, scrape, wait_for

    client = redis.Redis.from_url(stack.redis.url, decode_responses=True)
    key, digest = keyring.add(client, "dave")
    try:
        with stack.client(key) as dave:
            wait_for(lambda: dave.get("/v1/jobs").status_code == 200, 10, 0.2, "the added key to be accepted")
            before = sample_sum(scrape(stack), "ray_undiffuse_auth_failures_total", reason="revoked")
            keyring.revoke(client, digest, "dave")
            revoked_at = time.monotonic()
            wait_for(lambda: dave.get("/v1/jobs").status_code == 401, 10, 0.1, "the revoked key to be refused")
            assert time.monotonic() - revoked_at < keyring.REFRESH_SECONDS + 1.5
            assert dave.get("/v1/jobs").json()["detail"] == "API key revoked"
        with stack.client() as alice:
            assert alice.get("/v1/jobs").status_code == 200  # configured keys are untouched

        def counted():
            return sample_sum(scrape(stack), "ray_undiffuse_auth_failures_total", reason="revoked") > before

        wait_for(counted, 30, 0.5, "the refusal to be exported")
    finally:
        with client.pipeline(transaction=True) as pipe:
            pipe.hdel(keyring.KEYS, digest).hdel(keyring.REVOKED, digest).incr(keyring.VERSION).execute()
        client.close()
