"""What one client may take of what every tenant shares: request bodies counted as they arrive,
long responses counted per owner across replicas, a full Redis answering 503, and inputs that
could only end as a 500 refused as 4xx."""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest
from httpx_sse import connect_sse

from service.api_keys import digest
from tests.service.conftest import KEY_A, wait_for

pytestmark = pytest.mark.integration


def _call(app, method: str, path: str, headers: list[tuple[bytes, bytes]], chunks: list[bytes]):
    """Run the ASGI app on one request whose body arrives as `chunks`; returns (status, body,
    how many chunks the app pulled)."""
    pulled = 0
    sent: list[dict] = []

    async def receive():
        nonlocal pulled
        if pulled < len(chunks):
            pulled += 1
            return {"type": "http.request", "body": chunks[pulled - 1], "more_body": pulled < len(chunks)}
        await asyncio.sleep(3600)  # the client is still there

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test"), (b"authorization", f"Bearer {KEY_A}".encode()), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], body, pulled


def test_a_body_without_length_is_cut_at_the_limit_as_it_arrives(asgi_api):
    """An unauthenticated chunked upload of 64 MiB is refused after the limit's worth of chunks
    has been read (read whole first, 300 MB grew the replica by 899 MB: docs/reliability.md)."""
    from service.api.fastapi_app import app

    asgi_api(max_body_bytes=64 * 1024)
    chunk = b"x" * 16 * 1024
    chunks = [chunk] * 4096  # 64 MiB
    status, body, pulled = _call(
        app, "POST", "/v1/jobs", [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")], chunks
    )
    assert status == 413 and "limit of 65536 bytes" in json.loads(body)["detail"]
    assert pulled <= 5  # 4 chunks fit, the fifth crosses the limit: the rest is never read


def test_a_body_of_unknown_length_where_none_is_taken_is_411_and_a_declared_one_over_the_limit_413(asgi_api):
    from service.api.fastapi_app import app

    asgi_api()
    status, body, pulled = _call(app, "GET", "/v1/jobs", [(b"transfer-encoding", b"chunked")], [b"x" * 1024] * 8)
    assert status == 411 and "takes no request body" in json.loads(body)["detail"] and pulled == 0
    status, body, pulled = _call(
        app, "POST", "/v1/jobs", [(b"content-type", b"application/json"), (b"content-length", b"99999999")], [b"{}"]
    )
    assert status == 413 and pulled == 0
    status, _, _ = _call(app, "POST", "/v1/jobs", [(b"content-length", b"12, 12")], [b"{}"])
    assert status == 400
    status, _, _ = _call(app, "POST", "/v1/jobs", [(b"content-length", b"0" * 5000 + b"2")], [b"{}"])
    assert status == 400  # past int()'s 4,300 digits: was a 500


def test_oversized_headers_are_431(asgi_api):
    client = asgi_api()
    r = client.get("/v1/models", headers={"X-Padding": "x" * 20_000})
    assert r.status_code == 431 and "the limit is 16384" in r.json()["detail"]


@pytest.mark.parametrize(
    "raw, field",
    [
        ('{"class_label": 1, "model": "\\ud800"}', "model"),
        ('{"class_label": 1, "webhook_url": "https://hooks.example.com/\\udfff"}', "webhook_url"),
        ('{"class_label": 1, "sampler": "dd\\ud800im"}', "sampler"),
    ],
)
def test_a_lone_surrogate_in_a_string_field_is_422_naming_the_field(asgi_api, raw, field):
    r = asgi_api().post("/v1/jobs", content=raw.encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 422, r.text
    assert any(e["loc"][-1] == field for e in r.json()["detail"]), r.text


def test_a_lone_surrogate_as_an_unknown_field_name_is_422_not_500(asgi_api):
    r = asgi_api().post(
        "/v1/jobs", content=b'{"class_label": 1, "\\ud800": 1}', headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 422 and "unicode" in r.text  # pydantic refuses the key itself


def test_a_last_event_id_past_64_bits_is_400(asgi_api):
    client = asgi_api()
    job = client.post("/v1/jobs", json={"class_label": 1, "steps": 5}).json()
    for bad in (f"{2**64}-0", f"1-{2**64}"):
        r = client.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": bad})
        assert r.status_code == 400, (bad, r.status_code)


def test_docs_are_not_served_in_production(asgi_api):
    assert asgi_api().get("/docs").status_code == 200  # development: Swagger UI
    production = asgi_api(
        environment="production", api_keys=[f"alice=sha256:{digest(KEY_A)}"], webhook_allow_private=False
    )
    assert production.get("/docs").status_code == 404
    assert production.get("/openapi.json").status_code == 200


def test_streams_and_downloads_are_counted_per_owner_across_replicas(asgi_api, live_api, stack):
    """40 concurrent streams with a cap of 4 open exactly 4, counted per owner across replicas
    (a per-replica count would let 39 of 40 through). (An archive download takes a slot like a
    stream: `python -m bench.drills.resources` shows it on a stack with Workers;
    tests/service/jobs/test_slots.py its release.)"""
    import redis

    from service.jobs import redis_keys

    asgi_api(max_event_streams_per_key=4, event_stream_max_seconds=30)
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=30) as client:
        job = client.post("/v1/jobs", json={"num_images": 1, "class_label": 1, "steps": 5}).json()
        statuses: list[int] = []
        release = threading.Event()
        lock = threading.Lock()

        def open_stream() -> None:
            with httpx.Client(base_url=live_api, headers=headers, timeout=30) as own:
                with connect_sse(own, "GET", f"/v1/jobs/{job['id']}/events") as source:
                    with lock:
                        statuses.append(source.response.status_code)
                    if source.response.status_code == 200:
                        release.wait(30)

        threads = [threading.Thread(target=open_stream) for _ in range(40)]
        for t in threads:
            t.start()
        wait_for(lambda: len(statuses) == 40, 30, 0.05, "every stream to be answered")
        assert statuses.count(200) == 4 and statuses.count(429) == 36
        db = redis.Redis.from_url(stack.redis.url.rsplit("/", 1)[0] + "/6")
        owner = digest(KEY_A)[:24]
        assert db.zcard(redis_keys.owner_slots(owner)) == 4 and 0 < db.pttl(redis_keys.owner_slots(owner)) <= 30_000
        release.set()
        for t in threads:
            t.join(30)
        # the streams' slots are given back as their clients go
        wait_for(lambda: db.zcard(redis_keys.owner_slots(owner)) == 0, 15, 0.1, "the slots to be released")


def test_a_full_redis_answers_503_and_keeps_what_it_has(asgi_api, tmp_path):
    """Redis at maxmemory with noeviction refuses the write; the API says 503 with Retry-After
    and the jobs already stored are all still there."""
    import redis

    from service.dev.servers import RedisServer
    from service.jobs import redis_keys

    with RedisServer(tmp_path / "redis", maxmemory="4mb").start() as small:
        client = asgi_api(
            redis_url=small.url, max_jobs_in_flight_per_key=100_000, max_submissions_per_minute_per_key=100_000
        )
        ids = []
        r = None
        for _ in range(2000):
            r = client.post("/v1/jobs", json={"class_label": [1] * 64, "num_images": 64, "steps": 5})
            if r.status_code != 202:
                break
            ids.append(r.json()["id"])
        assert r is not None and r.status_code == 503, r.text
        assert "full" in r.json()["detail"] and int(r.headers["Retry-After"]) > 0
        assert ids  # some fitted
        direct = redis.Redis.from_url(small.url)
        assert direct.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert direct.exists(*(redis_keys.job(job_id) for job_id in ids)) == len(ids)  # nothing evicted


def test_a_settings_error_does_not_echo_its_input():
    """A mistyped setting may be a secret (a key pasted in the wrong variable)."""
    from pydantic import ValidationError

    from service.settings import Settings

    secret = "ud_live_secret_9f3a"
    with pytest.raises(ValidationError) as caught:
        Settings(redis_timeout_seconds=secret)
    assert "redis_timeout_seconds" in str(caught.value) and secret not in str(caught.value)
    with pytest.raises(ValidationError) as caught:
        Settings(environment="production", api_keys=[f"alice={secret}"])
    assert secret not in str(caught.value)


def test_image_steps_in_flight_and_per_day_are_quotas_per_owner(asgi_api):
    """Jobs of 1,000 image-steps (10 images x 100 steps): two fit in 2,000 in flight, a third is
    429; a day of 3,500 takes three (replays and refused jobs spend nothing), a fourth is 429."""
    client = asgi_api(max_job_cost=1000, max_cost_in_flight_per_key=2000, max_cost_per_day_per_key=3500)
    job = {"num_images": 10, "steps": 100, "class_label": 1}
    first = client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "one"})
    assert first.status_code == 202
    assert client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "one"}).status_code == 200  # a replay
    assert client.post("/v1/jobs", json=job).status_code == 202
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 429 and "image-steps queued or running" in r.json()["detail"], r.text
    assert int(r.headers["Retry-After"]) >= 1
    assert client.post(f"/v1/jobs/{first.json()['id']}/cancel").status_code == 200  # room in flight again
    assert client.post("/v1/jobs", json=job).status_code == 202  # 3,000 spent today
    client.post(f"/v1/jobs/{first.json()['id']}/cancel")
    r = client.post("/v1/jobs", json={**job, "num_images": 1})  # 100 more: 3,100
    assert r.status_code == 429 and "image-steps queued or running" in r.json()["detail"]
    jobs = client.get("/v1/jobs", params={"status": "queued"}).json()["jobs"]
    for queued in jobs:
        client.post(f"/v1/jobs/{queued['id']}/cancel")
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 429 and "per day" in r.json()["detail"] and "500 are left" in r.json()["detail"], r.text
    assert client.post("/v1/jobs", json={**job, "num_images": 5}).status_code == 202  # 500 fit
    # the day is spent, and a retry of a job already made still gets its job
    assert client.post("/v1/jobs", json=job, headers={"Idempotency-Key": "one"}).status_code == 200


def test_reads_are_rate_limited_per_owner(asgi_api):
    client = asgi_api(max_reads_per_minute_per_key=5)
    job = client.post("/v1/jobs", json={"class_label": 1, "steps": 5}).json()  # a submission is not a read
    answers = [client.get(f"/v1/jobs/{job['id']}").status_code for _ in range(5)]
    assert answers == [200] * 5
    r = client.get("/v1/jobs")
    assert r.status_code == 429 and "reads per minute" in r.json()["detail"] and int(r.headers["Retry-After"]) >= 1
    assert client.get("/v1/models").status_code == 429


def test_an_owner_past_its_stored_bytes_gets_429_until_it_deletes_jobs(asgi_api, stack):
    """The in-process API has no Workers: a shard's completion is written as a Worker writes it."""
    from service.jobs.records import JobStatus, ShardTask
    from service.jobs.store import JobStore

    client = asgi_api(max_stored_bytes_per_key=1000)
    job = client.post("/v1/jobs", json={"num_images": 4, "steps": 5, "class_label": 1}).json()
    owner = digest(KEY_A)[:24]

    async def complete_and_end() -> None:
        store = JobStore.from_url(stack.redis.url.rsplit("/", 1)[0] + "/6", 3600, 4)
        record = await store.get(job["id"])
        task = ShardTask(job_id=job["id"], shard=0, start=0, count=4, owner=owner, params=record.params)
        await store.complete_shard(task, [("ab" * 32, 300)] * 4)
        await store.finish(job["id"], owner, JobStatus.failed)
        await store.close()

    asyncio.run(complete_and_end())
    r = client.post("/v1/jobs", json={"num_images": 1, "steps": 5, "class_label": 1})
    assert r.status_code == 429 and "1,200 bytes of images stored" in r.json()["detail"], r.text
    assert client.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert client.post("/v1/jobs", json={"num_images": 1, "steps": 5, "class_label": 1}).status_code == 202


def test_through_the_stack_a_jobs_bytes_count_for_its_owner_until_it_is_deleted(api, stack):
    import redis

    from service.jobs import redis_keys
    from tests.service.conftest import wait_for_status, wait_idle

    wait_idle(stack)
    db = redis.Redis.from_url(stack.redis.url)
    owner_key = redis_keys.owner_stored_bytes(digest(KEY_A)[:24])
    before = int(db.get(owner_key) or 0)
    job = api.post("/v1/jobs", json={"num_images": 6, "steps": 3, "class_label": 7}).json()
    done = wait_for_status(api, job["id"], {"succeeded"})
    manifest = httpx.get(done["manifest_url"], timeout=30).json()
    assert int(db.get(owner_key)) - before == sum(image["size"] for image in manifest["images"])
    assert db.exists(redis_keys.job_files(job["id"])) == 0  # the manifest holds the checksums now
    assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert int(db.get(owner_key) or 0) == before


def test_models_say_the_most_steps_a_job_may_ask_under_the_services_cap(asgi_api):
    """UNDIFFUSE_MAX_STEPS below a model's timesteps: /v1/models says so (the web page's steps
    field takes its max from it), and a job asking one more is refused naming the field."""
    client = asgi_api(max_steps=100)
    mnist = next(m for m in client.get("/v1/models").json()["models"] if m["name"] == "mnist")
    assert (mnist["num_timesteps"], mnist["max_steps"]) == (1000, 100)
    assert client.post("/v1/jobs", json={"class_label": 1, "steps": 100}).status_code == 202
    refused = client.post("/v1/jobs", json={"class_label": 1, "steps": 101})
    assert refused.status_code == 422 and "steps" in refused.text and "at most 100" in refused.text
