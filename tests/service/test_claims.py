"""Claims the README and the docs make, each with a test that fails if it breaks: the caps on a
job's event stream and previews, quotas shared by one owner's keys, the webhook retry schedule
as documented, one job for two concurrent submissions with one Idempotency-Key, and a webhook
host with one private address among public ones refused."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import KEY_A, KEY_CAROL_NEW, KEY_CAROL_OLD

ROOT = Path(__file__).resolve().parents[2]
JOB = {"num_images": 1, "class_label": 2, "steps": 2}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- the event stream and previews ----------------------------------------------------------------
def test_a_jobs_event_stream_is_capped_at_about_max_events_keeping_the_newest(redis_server):
    """Every append goes through one Lua helper (emit) that trims the stream with XADD MAXLEN ~
    MAX_EVENTS: a job that emits far more keeps about that many, the newest."""
    import redis

    from service.jobs import events

    client = redis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + "/5", decode_responses=True)
    client.flushdb()
    try:
        client.set("job", "x", px=600_000)
        emit_many = client.register_script(
            events.LUA
            + """
local last
for i = 1, tonumber(ARGV[1]) do last = emit(KEYS[1], KEYS[2], 'progress', tostring(i)) end
return last
"""
        )
        emitted = events.MAX_EVENTS + 2_500
        last = emit_many(keys=["job", "events"], args=[emitted])
        length = client.xlen("events")
        # MAXLEN ~ trims whole stream nodes (100 entries each by default): never more than a node over
        assert events.MAX_EVENTS <= length <= events.MAX_EVENTS + 100
        newest = client.xrevrange("events", count=1)[0]
        assert newest[0] == last and newest[1]["data"] == str(emitted)
        oldest = client.xrange("events", count=1)[0]
        assert int(oldest[1]["data"]) == emitted - length + 1  # the oldest went first
        assert 0 < client.pttl("events") <= 600_000  # and the stream lives as long as the record
    finally:
        client.flushdb()


@pytest.mark.parametrize("steps", [100, 500, 1000])
def test_a_job_asks_for_at_most_max_previews_previews(asgi_api, steps):
    """README: preview_every is at least steps / 100 (at most 100 previews per job)."""
    from service.jobs.events import MAX_PREVIEWS

    client = asgi_api()
    fewest = -(-steps // MAX_PREVIEWS)
    body = {**JOB, "steps": steps, "previews": True}
    if fewest > 1:
        refused = client.post("/v1/jobs", json={**body, "preview_every": fewest - 1})
        assert refused.status_code == 422
        assert [e["loc"][-1] for e in refused.json()["detail"]] == ["preview_every"]
    accepted = client.post("/v1/jobs", json={**body, "preview_every": fewest})
    assert accepted.status_code == 202, accepted.text
    assert MAX_PREVIEWS == 100  # the number the README states


# --- one owner, two keys ----------------------------------------------------------------------------
def test_two_keys_of_one_owner_share_the_per_minute_quota(asgi_api):
    client = asgi_api(max_submissions_per_minute_per_key=3)
    answers = [
        client.post("/v1/jobs", json=JOB, headers=bearer(key)).status_code
        for key in (KEY_CAROL_OLD, KEY_CAROL_NEW, KEY_CAROL_OLD)
    ]
    assert answers == [202, 202, 202]
    refused = client.post("/v1/jobs", json=JOB, headers=bearer(KEY_CAROL_NEW))
    assert refused.status_code == 429 and "per minute" in refused.json()["detail"]
    assert client.post("/v1/jobs", json=JOB, headers=bearer(KEY_A)).status_code == 202  # another owner's


def test_two_keys_of_one_owner_share_the_jobs_in_flight_quota(asgi_api):
    client = asgi_api(max_jobs_in_flight_per_key=2)
    first = client.post("/v1/jobs", json=JOB, headers=bearer(KEY_CAROL_OLD))
    assert first.status_code == 202
    assert client.post("/v1/jobs", json=JOB, headers=bearer(KEY_CAROL_NEW)).status_code == 202
    refused = client.post("/v1/jobs", json=JOB, headers=bearer(KEY_CAROL_OLD))
    assert refused.status_code == 429 and "queued or running" in refused.json()["detail"]
    assert client.post("/v1/jobs", json=JOB, headers=bearer(KEY_A)).status_code == 202  # another owner's
    # one of carol's keys ends a job the other submitted, and either may submit again
    job_id = first.json()["id"]
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=bearer(KEY_CAROL_NEW)).status_code == 200
    assert client.post("/v1/jobs", json=JOB, headers=bearer(KEY_CAROL_NEW)).status_code == 202


# --- the webhook retry schedule ------------------------------------------------------------------------
DURATION = r"\d+ (?:s|min|h)"
UNIT_S = {"s": 1, "min": 60, "h": 3600}


def documented_delays(text: str) -> list[list[float]]:
    """Every list of eight retry delays the text states ("5 s, 30 s, 2 min, ... 1 h and 1 h"), in seconds."""
    lists = re.findall(rf"((?:{DURATION}(?:,| and)\s+){{7}}{DURATION})", text)
    return [[int(n) * UNIT_S[u] for n, u in re.findall(r"(\d+) (s|min|h)", found)] for found in lists]


@pytest.mark.parametrize("doc", ["README.md", "docs/architecture.md", "docs/deploy.md"])
def test_the_webhook_retry_schedule_is_what_the_docs_say(doc):
    from service.jobs.webhook_schedule import JITTER, MAX_ATTEMPTS, RETRY_SCHEDULE
    from service.settings import Settings

    text = re.sub(r"\s+", " ", (ROOT / doc).read_text())
    base = Settings.model_fields["webhook_retry_base_seconds"].default
    delays = [step * base for step in RETRY_SCHEDULE]
    stated = documented_delays(text)
    assert stated, f"{doc} states no retry schedule"
    assert all(s == delays for s in stated), (doc, stated, delays)
    span_h = sum(delays) / 3600
    if doc == "docs/architecture.md":  # "about 3 h in all, at least 2.3 h"
        about, least = re.search(r"about (\d+) h in all, at least (\d+\.\d) h", text).groups()
        assert float(least) == round(span_h * (1 - JITTER), 1)
    else:  # "9 attempts over about 3 hours" / "9 attempts over about 3 h"
        attempts, about = re.search(r"(\d+) attempts over about (\d+) (?:h|hours)\b", text).groups()
        assert int(attempts) == MAX_ATTEMPTS == len(delays) + 1
    assert int(about) == round(span_h)
    assert f"±{round(JITTER * 100)} %" in text or doc == "docs/deploy.md"


def test_retry_delays_follow_the_schedule_within_the_jitter_and_stop_after_the_last_attempt():
    import random

    from service.jobs.webhook_schedule import JITTER, MAX_ATTEMPTS, RETRY_SCHEDULE, retry_delay

    rng = random.Random(7)
    for attempt, step in enumerate(RETRY_SCHEDULE, 1):
        for _ in range(50):
            delay = retry_delay(attempt, 5.0, rng)
            assert step * 5.0 * (1 - JITTER) <= delay <= step * 5.0 * (1 + JITTER)
    assert retry_delay(MAX_ATTEMPTS, 5.0, rng) is None  # the ninth attempt was the last


# --- idempotency under concurrency ----------------------------------------------------------------------
def test_two_concurrent_submissions_with_one_idempotency_key_make_one_job(live_api):
    """Both requests are in flight at once (a barrier releases them together), many times over:
    each pair makes exactly one job, and both answers name it."""
    with httpx.Client(base_url=live_api, headers=bearer(KEY_A), timeout=30) as client:
        before = len(client.get("/v1/jobs", params={"limit": 100}).json()["jobs"])
        pairs = 12
        for n in range(pairs):
            barrier = threading.Barrier(2)
            answers: list[httpx.Response] = []

            def submit(key: str, barrier: threading.Barrier, answers: list) -> None:
                barrier.wait(10)
                answers.append(client.post("/v1/jobs", json=JOB, headers={"Idempotency-Key": key}))

            threads = [threading.Thread(target=submit, args=(f"concurrent-{n}", barrier, answers)) for _ in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(30)
            assert sorted(r.status_code for r in answers) == [200, 202], [r.text for r in answers]
            assert answers[0].json()["id"] == answers[1].json()["id"]
        jobs = client.get("/v1/jobs", params={"limit": 100}).json()["jobs"]
        assert len(jobs) - before == pairs


# --- webhooks: a name with a private address among public ones ------------------------------------------
def test_a_webhook_host_with_one_public_and_one_private_address_is_refused_at_submission(monkeypatch):
    from types import SimpleNamespace

    from fastapi.exceptions import RequestValidationError

    from service.api.schemas import JobCreate
    from service.api.webhook_routes import webhook_target
    from service.settings import Settings
    from service.webhooks import addresses

    def getaddrinfo(host, port, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.215.14", "10.0.0.1")]

    monkeypatch.setattr(addresses, "LOOKUPS", addresses.Lookups(getaddrinfo=getaddrinfo))
    ctx = SimpleNamespace(settings=Settings())
    with pytest.raises(RequestValidationError) as refused:
        asyncio.run(webhook_target(JobCreate(webhook_url="https://mixed.example/hook"), ctx, owner="alice"))
    (error,) = refused.value.errors()
    assert error["loc"] == ("body", "webhook_url")
    assert "'mixed.example' does not resolve to a public address" in error["msg"]
    assert "10.0.0.1" not in error["msg"]  # the guard tells nothing of what the DNS answered
