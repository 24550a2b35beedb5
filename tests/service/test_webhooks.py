"""Webhooks against real servers: a receiver on 127.0.0.1 (http.server) verifies every delivery
with the `standardwebhooks` library. The dispatcher's retries, timeouts, redirects, delivery-time
address checks and exclusivity run in-process on the real Redis (database 8, which the stack's
Workers never read); a real job's deliveries and the submission checks go through the Ray Serve
stack (two Worker replicas, so two dispatchers) and the in-process API."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from service.api_keys import digest
from service.jobs import redis_keys
from service.jobs.records import JobStatus
from service.jobs.store import JobStore
from service.jobs.webhook_schedule import MAX_ATTEMPTS, WebhookOutcome
from service.settings import Settings
from service.storage import ObjectStore
from service.webhooks.signing import owner_secret
from tests.service.conftest import KEY_A, KEY_CAROL_NEW, KEY_CAROL_OLD, wait_for, wait_for_status
from tests.service.jobs.test_store import params
from worker.dispatcher import POLL_S, Dispatcher

pytestmark = pytest.mark.integration
DB = 8


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: str
    at: float  # time.monotonic()


class Receiver:
    """A webhook receiver: records every request and answers each path from its script, in
    order (an int: that status; ("slow", s): 200 after s seconds; ("redirect", path): 302), then
    200 once the script is spent."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, list] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                receiver._answer(self, body)

            def do_GET(self) -> None:
                receiver._answer(self, "")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def _answer(self, handler: BaseHTTPRequestHandler, body: str) -> None:
        with self.lock:
            self.requests.append(
                Received(
                    handler.command,
                    handler.path,
                    {k.lower(): v for k, v in handler.headers.items()},
                    body,
                    time.monotonic(),
                )
            )
            script = self.scripts.get(handler.path, [])
            action = script.pop(0) if script else 200
        with contextlib.suppress(OSError):  # a client that timed out has gone
            if isinstance(action, tuple) and action[0] == "slow":
                time.sleep(action[1])
                action = 200
            if isinstance(action, tuple) and action[0] == "redirect":
                handler.send_response(302)
                handler.send_header("Location", action[1])
            else:
                handler.send_response(action)
            handler.send_header("Content-Length", "0")
            handler.end_headers()

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


# --- the dispatcher, in-process ------------------------------------------------------------------
def scenario(redis_server, settings: Settings, body, dispatchers: int = 1):
    """Run `body(store, dispatchers)` with a fresh store on database DB and `dispatchers` running
    Dispatchers (each on its own Redis client, as replicas would be)."""

    async def main():
        url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
        store = JobStore.from_url(url, 600, 4)
        await store.r.flushdb()
        stores = [JobStore.from_url(url, 600, 4) for _ in range(dispatchers)]
        running = [
            Dispatcher(settings.webhooks, s, ObjectStore(settings.storage), record_metrics=False) for s in stores
        ]
        tasks = [asyncio.create_task(d.run()) for d in running]
        try:
            return await body(store, running)
        finally:
            for d in running:
                await d.drain(timeout=5)
            for t in tasks:
                t.cancel()
            await store.r.flushdb()
            for s in [store, *stores]:
                await s.close()

    return asyncio.run(main())


def dispatcher_settings(**overrides) -> Settings:
    return Settings(
        **{
            "webhook_allow_private": True,
            "webhook_retry_base_seconds": 0.05,
            "webhook_timeout_seconds": 1.0,
            **overrides,
        }
    )


async def canceled_job(store: JobStore, url: str, events=("started", "canceled"), owner: str = "alice") -> str:
    job_id, _, _ = await store.submit(owner, params(4), {"n": uuid.uuid4().hex}, webhook=(url, list(events)))
    await store.mark_running(job_id, owner)
    await store.finish(job_id, owner, JobStatus.canceled)
    return job_id


async def until(store: JobStore, job_id: str, event: str, check, timeout: float = 30) -> WebhookOutcome:
    """Poll the job's outcome of `event` until check(outcome) holds."""
    deadline = time.monotonic() + timeout
    while True:
        record = await store.get(job_id)
        found = [o for o in record.webhooks if o.event == event]
        if found and check(found[0]):
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting on the {event} delivery of {job_id}: {found}")
        await asyncio.sleep(0.02)


def test_a_receiver_failing_three_times_gets_the_event_on_the_fourth_attempt(redis_server, receiver):
    receiver.scripts["/flaky"] = [500, 500, 500]
    settings = dispatcher_settings()
    secret = owner_secret("undiffuse-development-webhook-key", "alice")

    async def body(store, _):
        job_id = await canceled_job(store, receiver.url("/flaky"), events=["canceled"])
        outcome = await until(store, job_id, "canceled", lambda o: o.status != "pending")
        return job_id, outcome, await store.r.zcard(redis_keys.WEBHOOKS_DUE)

    job_id, outcome, left = scenario(redis_server, settings, body)
    assert (outcome.status, outcome.attempts, outcome.last_status_code) == ("delivered", 4, 200)
    assert outcome.last_error is None and outcome.delivered_at >= outcome.created_at and left == 0
    got = receiver.to("/flaky")
    assert len(got) == 4 and len({r.headers["webhook-id"] for r in got}) == 1  # one message, four attempts
    for r in got:
        sent = Webhook(secret).verify(r.body, r.headers)
        assert sent["type"] == "job.canceled" and sent["data"]["id"] == job_id
        assert sent["data"]["status"] == "canceled" and sent["data"]["results_count"] == 0
    gaps = [b.at - a.at for a, b in zip(got, got[1:], strict=False)]
    assert gaps[0] >= 0.8 * 0.05 and gaps[1] >= 0.8 * 0.3 and gaps[2] >= 0.8 * 1.2  # backing off


def test_a_slow_receiver_times_out_and_is_retried(redis_server, receiver):
    receiver.scripts["/slow"] = [("slow", 3.0)]
    settings = dispatcher_settings(webhook_timeout_seconds=0.5, webhook_retry_base_seconds=1.0)

    async def body(store, _):
        job_id = await canceled_job(store, receiver.url("/slow"), events=["canceled"])
        first = await until(store, job_id, "canceled", lambda o: o.attempts == 1 and o.last_error is not None)
        last = await until(store, job_id, "canceled", lambda o: o.status != "pending")
        return first, last

    started = time.monotonic()
    first, last = scenario(redis_server, settings, body)
    assert first.status == "pending" and first.last_error == "timed out after 0.5 s"
    assert first.last_status_code is None and first.next_attempt_at > first.created_at
    assert (last.status, last.attempts, last.last_status_code) == ("delivered", 2, 200)
    assert len(receiver.to("/slow")) == 2
    assert time.monotonic() - started < 10  # the first attempt did not wait out the receiver's 3 s


def test_a_redirect_is_not_followed(redis_server, receiver):
    receiver.scripts["/moved"] = [("redirect", "/elsewhere")]
    settings = dispatcher_settings(webhook_retry_base_seconds=1.0)

    async def body(store, _):
        job_id = await canceled_job(store, receiver.url("/moved"), events=["canceled"])
        first = await until(store, job_id, "canceled", lambda o: o.attempts == 1 and o.last_status_code is not None)
        last = await until(store, job_id, "canceled", lambda o: o.status != "pending")
        return first, last

    first, last = scenario(redis_server, settings, body)
    assert (first.status, first.last_status_code) == ("pending", 302)
    assert "redirects are not followed" in first.last_error
    assert (last.status, last.attempts) == ("delivered", 2)
    assert receiver.to("/elsewhere") == [] and len(receiver.to("/moved")) == 2


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_delivery_checks_the_address_again_and_refuses_a_private_one(redis_server, receiver, host):
    """The URL passed the check at submission, but now resolves to loopback (DNS changed):
    nothing is sent, and the attempt says why (for a name, without telling what it resolves to)."""
    settings = dispatcher_settings(webhook_allow_private=False, webhook_allowed_ports=[receiver.server.server_port])

    async def body(store, _):
        url = receiver.url("/internal").replace("127.0.0.1", host)
        job_id = await canceled_job(store, url, events=["canceled"])
        return await until(store, job_id, "canceled", lambda o: o.attempts >= 1 and o.last_error is not None)

    outcome = scenario(redis_server, settings, body)
    assert outcome.status == "pending" and outcome.last_status_code is None
    assert outcome.last_error == (
        "refused: 127.0.0.1, a loopback address; webhooks go to public addresses only"
        if host == "127.0.0.1"
        else "refused: host 'localhost' does not resolve to a public address; webhooks go to public addresses only"
    )
    assert receiver.to("/internal") == []


def test_the_last_failed_attempt_gives_up(redis_server, receiver):
    receiver.scripts["/down"] = [503] * (MAX_ATTEMPTS + 5)
    settings = dispatcher_settings(webhook_retry_base_seconds=0.001)

    async def body(store, _):
        job_id = await canceled_job(store, receiver.url("/down"), events=["canceled"])
        outcome = await until(store, job_id, "canceled", lambda o: o.status != "pending")
        return outcome, await store.r.zcard(redis_keys.WEBHOOKS_DUE)

    outcome, left = scenario(redis_server, settings, body)
    assert (outcome.status, outcome.attempts, outcome.last_status_code) == ("failed", MAX_ATTEMPTS, 503)
    assert outcome.last_error == "HTTP 503" and outcome.next_attempt_at is None and left == 0
    assert len(receiver.to("/down")) == MAX_ATTEMPTS


def test_two_dispatchers_send_each_event_exactly_once(redis_server, receiver):
    receiver.scripts["/many"] = [("slow", 0.05)] * 40  # attempts overlap the other dispatcher's rounds
    settings = dispatcher_settings()

    async def body(store, running):
        jobs = [await canceled_job(store, receiver.url("/many")) for _ in range(15)]
        for job_id in jobs:
            for event in ("started", "canceled"):
                await until(store, job_id, event, lambda o: o.status == "delivered")
        return jobs

    jobs = scenario(redis_server, settings, body, dispatchers=2)
    ids = Counter(r.headers["webhook-id"] for r in receiver.to("/many"))
    assert sorted(ids) == sorted(f"msg_{j}_{e}" for j in jobs for e in ("started", "canceled"))
    assert set(ids.values()) == {1}


async def delivered_after(store: JobStore, url: str, owner: str, timeout: float = 20) -> float:
    """Seconds from the job's cancel to its delivery (polled every 20 ms)."""
    started = time.monotonic()
    job_id = await canceled_job(store, url, events=["canceled"], owner=owner)
    await until(store, job_id, "canceled", lambda o: o.status == "delivered", timeout=timeout)
    return time.monotonic() - started


def test_an_owner_whose_receiver_never_answers_does_not_delay_another_owners_delivery(redis_server, receiver):
    """Alice's 40 deliveries go to a receiver that never answers within the attempt's 5 s; Bob's
    one, due after all of hers, still goes within a round (POLL_S), as it would alone: she holds
    her 4 slots (webhook_concurrency_per_owner), not the replica's 16."""
    receiver.scripts["/never"] = [("slow", 30.0)] * 200
    settings = dispatcher_settings(webhook_timeout_seconds=5.0, webhook_retry_base_seconds=60.0)

    async def body(store, _):
        for _ in range(40):
            await canceled_job(store, receiver.url("/never"), events=["canceled"], owner="slow-alice")
        await asyncio.sleep(0.5)  # her deliveries are in flight, the rest due behind them
        return await delivered_after(store, receiver.url("/bob"), owner="bob")

    took = scenario(redis_server, settings, body)
    assert took < POLL_S + 1.0, took
    assert len(receiver.to("/never")) == settings.webhook_concurrency_per_owner  # her slots, no more


@pytest.fixture
def hanging_dns(monkeypatch):
    """getaddrinfo that never answers (until the test ends) for names under hang.example, and
    answers 127.0.0.1 for any other name."""
    import socket

    from service.webhooks import addresses

    release = threading.Event()
    hung: list[str] = []

    def getaddrinfo(host, port, **kwargs):
        if host.endswith("hang.example"):
            hung.append(host)
            release.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(addresses, "LOOKUPS", addresses.Lookups(getaddrinfo=getaddrinfo))
    yield hung
    release.set()


def test_an_owner_whose_dns_never_answers_does_not_delay_another_owners_delivery(redis_server, receiver, hanging_dns):
    """Alice's webhook host never resolves; her attempts give up after 0.5 s and come back
    50 ms later, while each lookup goes on holding a thread. Bob's delivery still resolves and
    goes within a round: Alice never has more than her budget of lookups running."""
    settings = dispatcher_settings(webhook_resolve_timeout_seconds=0.5)
    port = receiver.server.server_port

    async def body(store, _):
        for _ in range(40):
            await canceled_job(store, f"http://alice.hang.example:{port}/a", events=["canceled"], owner="dns-alice")
        await asyncio.sleep(3.0)  # many rounds of her attempts, each leaving a lookup behind
        return await delivered_after(store, receiver.url("/bob").replace("127.0.0.1", "bob.example"), owner="dns-bob")

    took = scenario(redis_server, settings, body)
    assert took < POLL_S + 1.0, took
    assert len(hanging_dns) == settings.webhook_resolve_concurrency_per_owner
    assert len(receiver.to("/bob")) == 1 and receiver.to("/a") == []


# --- through the Ray Serve stack and the API -------------------------------------------------------
def test_a_jobs_deliveries_verify_with_the_secret_its_owner_reads(stack, api, receiver):
    secret = api.get("/v1/webhook-secret").json()["secret"]
    with stack.client(KEY_CAROL_OLD) as carol_old, stack.client(KEY_CAROL_NEW) as carol_new:
        carol = carol_old.get("/v1/webhook-secret").json()["secret"]
        assert carol_new.get("/v1/webhook-secret").json()["secret"] == carol != secret  # per owner, not per key
    with stack.client(None) as anonymous:
        assert anonymous.get("/v1/webhook-secret").status_code == 401

    r = api.post(
        "/v1/jobs",
        json={
            "num_images": 2,
            "steps": 4,
            "class_label": 3,
            "webhook_url": receiver.url("/job"),
            "webhook_events": ["started", "succeeded"],
        },
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    wait_for_status(api, job_id, {"succeeded"})

    def delivered():
        view = api.get(f"/v1/jobs/{job_id}").json()
        hooks = view["webhooks"]
        return view if [h["status"] for h in hooks] == ["delivered", "delivered"] else None

    view = wait_for(delivered, 60, 0.2, "both deliveries")
    assert [(h["event"], h["attempts"], h["last_status_code"]) for h in view["webhooks"]] == [
        ("started", 1, 200),
        ("succeeded", 1, 200),
    ]
    got = receiver.to("/job")
    assert len(got) == 2  # two Worker replicas, two dispatchers: each event once
    sent = {}
    for request in got:
        assert request.headers["content-type"] == "application/json"
        payload = Webhook(secret).verify(request.body, request.headers)  # raises unless signed for Alice
        sent[payload["type"]] = payload
        with pytest.raises(WebhookVerificationError):
            Webhook(carol).verify(request.body, request.headers)
    assert set(sent) == {"job.started", "job.succeeded"}
    assert sent["job.started"]["data"] == {**sent["job.started"]["data"], "id": job_id, "status": "running"}
    done = sent["job.succeeded"]["data"]
    assert (done["id"], done["status"], done["results_count"]) == (job_id, "succeeded", 2)
    assert done["manifest_url"].split("?")[0].endswith(f"jobs/{job_id}/manifest.json")
    assert done["progress"] == {"images_done": 2, "images_total": 2, "step": 4, "steps": 4}
    assert sent["job.succeeded"]["timestamp"].endswith("Z")
    assert json.loads(got[0].body)  # the signed bytes are the JSON payload


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1/hook", "127.0.0.1, a loopback address"),
        ("http://10.0.0.5/hook", "10.0.0.5, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://[::1]/hook", "::1, a loopback address"),
        ("http://localhost/hook", "host 'localhost' does not resolve to a public address"),
        ("http://0.0.0.0/hook", "0.0.0.0, an unspecified address"),
        ("http://[::ffff:192.168.0.1]/hook", "a private address"),
        ("https://192.0.0.192/hook", "192.0.0.192, a special-purpose address"),
        ("http://no-such-host.invalid/hook", "host 'no-such-host.invalid' does not resolve to a public address"),
        ("https://93.184.215.14:6379/hook", "port 6379 is not open to webhooks"),
        ("https://user:pass@93.184.215.14/hook", "must not contain a user name or password"),
    ],
)
def test_submissions_with_a_webhook_to_a_non_public_address_are_refused(asgi_api, url, reason):
    api = asgi_api(webhook_allow_private=False)
    r = api.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 1, "webhook_url": url})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"] and reason in error["msg"]
    assert api.get("/v1/jobs").json()["jobs"] == []  # nothing queued


def test_webhook_fields_are_validated(asgi_api):
    api = asgi_api(webhook_allow_private=False)
    base = {"num_images": 1, "steps": 2, "class_label": 1}
    for extra, field in [
        ({"webhook_url": "ftp://93.184.215.14/x"}, "webhook_url"),
        ({"webhook_url": "http:///nohost"}, "webhook_url"),
        ({"webhook_url": "https://93.184.215.14/" + "a" * 2100}, "webhook_url"),
        ({"webhook_events": ["succeeded"]}, "webhook_events"),  # without a URL
        ({"webhook_url": "https://93.184.215.14/x", "webhook_events": ["queued"]}, "webhook_events"),
        ({"webhook_url": "https://93.184.215.14/x", "webhook_events": ["failed", "failed"]}, "webhook_events"),
        ({"webhook_url": "https://93.184.215.14/x", "webhook_events": []}, "webhook_events"),
    ]:
        r = api.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 422, (extra, r.text)
        assert r.json()["detail"][0]["loc"][:2] == ["body", field], (extra, r.text)
    # a public address is accepted (nothing is sent: these jobs never run); events default to the terminal ones
    r = api.post("/v1/jobs", json={**base, "webhook_url": "https://93.184.215.14/x"})
    assert r.status_code == 202, r.text
    assert r.json()["webhooks"] == []  # nothing happened yet


def test_production_without_a_signing_key_refuses_webhooks(asgi_api):
    api = asgi_api(environment="production", api_keys=[f"alice=sha256:{digest(KEY_A)}"], webhook_allow_private=False)
    r = api.post(
        "/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 1, "webhook_url": "https://93.184.215.14/"}
    )
    assert r.status_code == 422 and "not enabled" in r.json()["detail"][0]["msg"]
    assert api.get("/v1/webhook-secret").status_code == 404


def test_production_takes_https_webhooks_only(asgi_api):
    api = asgi_api(
        environment="production",
        api_keys=[f"alice=sha256:{digest(KEY_A)}"],
        webhook_allow_private=False,
        webhook_signing_key="a-random-signing-key-0123456789",
    )
    base = {"num_images": 1, "steps": 2, "class_label": 1}
    r = api.post("/v1/jobs", json={**base, "webhook_url": "http://93.184.215.14/hook"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "webhook_url"] and "must be an https:// URL" in error["msg"]
    assert api.post("/v1/jobs", json={**base, "webhook_url": "https://93.184.215.14/hook"}).status_code == 202
