"""GET /v1/jobs/{id}/events through the real Ray Serve stack: the whole life of a job as
server-sent events, resumed with Last-Event-ID, previews only where asked, and only the job's
owner sees them."""

from __future__ import annotations

import base64
import io
import json

import pytest
from httpx_sse import connect_sse
from PIL import Image

from tests.service.conftest import KEY_CAROL_OLD, wait_for_status

pytestmark = pytest.mark.integration
TERMINAL = {"succeeded", "failed", "canceled"}


def stream(client, job_id: str, last_event_id: str | None = None) -> list:
    """Every event of the stream until the server ends it."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=120) as source:
        assert source.response.status_code == 200, source.response.read()
        assert source.response.headers["content-type"].startswith("text/event-stream")
        return list(source.iter_sse())


def test_a_job_streams_queued_started_progress_previews_and_one_terminal_event(api):
    r = api.post(
        "/v1/jobs",
        json={"num_images": 6, "steps": 12, "class_label": 5, "seed": 3, "previews": True, "preview_every": 3},
    )
    assert r.status_code == 202, r.text
    submitted = r.json()
    assert submitted["params"]["previews"] is True and submitted["params"]["preview_every"] == 3
    events = stream(api, submitted["id"])  # connected while it is queued or running: replay, then live

    kinds = [e.event for e in events]
    assert kinds[0] == "queued" and kinds[1] == "started"
    assert json.loads(events[0].data) == submitted  # the job view, as submit answered it
    assert [k for k in kinds if k in TERMINAL] == ["succeeded"] and kinds[-1] == "succeeded"
    ids = [tuple(map(int, e.id.split("-"))) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)

    progress = [json.loads(e.data) for e in events if e.event == "progress"]
    steps = [p["step"] for p in progress]
    assert progress and steps == sorted(steps)
    assert [p["images_done"] for p in progress] == sorted(p["images_done"] for p in progress)
    assert progress[-1] == {"step": 12, "steps": 12, "images_done": 6, "images_total": 6}
    assert kinds[-2] == "progress"  # the last step is told before the end

    previews = [json.loads(e.data) for e in events if e.event == "preview"]
    assert [(p["step"], p["steps"], p["index"]) for p in previews] == [(3, 12, 0), (6, 12, 0), (9, 12, 0)]
    for p in previews:
        with Image.open(io.BytesIO(base64.b64decode(p["png"]))) as im:
            assert im.format == "PNG" and im.size == (28, 28) and im.mode == "L"

    done = json.loads(events[-1].data)
    assert done == api.get(f"/v1/jobs/{submitted['id']}").json()  # the job view, with its results
    assert done["status"] == "succeeded" and len(done["results"]) == 6 and done["manifest_url"]

    # reconnecting after a middle event gets exactly the events after it, ending the same way;
    # an ended job's previews have left Redis (the images are the result), everything else stays
    kept = [(e.event, e.id) for e in events if e.event != "preview"]
    middle = len(events) // 2
    resumed = stream(api, submitted["id"], last_event_id=events[middle].id)
    assert [(e.event, e.id) for e in resumed] == [
        k for k in kept if k in {(e.event, e.id) for e in events[middle + 1 :]}
    ]
    assert resumed[-1].event == "succeeded"
    # and a finished job's stream replays to its terminal event
    assert [(e.event, e.id) for e in stream(api, submitted["id"])] == kept


def test_no_previews_unless_asked_and_a_canceled_job_ends_its_stream(api):
    plain = api.post("/v1/jobs", json={"num_images": 2, "steps": 6, "class_label": 1}).json()
    assert plain["params"]["previews"] is False and plain["params"]["preview_every"] is None
    events = stream(api, plain["id"])
    assert "preview" not in {e.event for e in events} and events[-1].event == "succeeded"
    assert json.loads([e for e in events if e.event == "progress"][-1].data)["step"] == 6

    canceled = api.post("/v1/jobs", json={"num_images": 8, "steps": 400, "class_label": 2, "previews": True}).json()
    assert canceled["params"]["preview_every"] == 50  # about 8 previews by default
    assert api.post(f"/v1/jobs/{canceled['id']}/cancel").status_code == 200
    events = stream(api, canceled["id"])
    kinds = [e.event for e in events]
    assert kinds[0] == "queued" and kinds[-1] == "canceled"
    assert [k for k in kinds if k in TERMINAL] == ["canceled"]
    assert json.loads(events[-1].data)["status"] == "canceled"
    wait_for_status(api, canceled["id"], {"canceled"})


def test_events_are_the_owners_alone_and_ids_are_checked(api, stack):
    job_id = api.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 0}).json()["id"]
    with stack.client(KEY_CAROL_OLD) as carol:
        other = carol.get(f"/v1/jobs/{job_id}/events")
        assert other.status_code == 404 and other.json() == carol.get(f"/v1/jobs/{job_id}").json()
    with stack.client(None) as anonymous:
        assert anonymous.get(f"/v1/jobs/{job_id}/events").status_code == 401
    assert api.get(f"/v1/jobs/{'0' * 32}/events").status_code == 404
    assert api.get(f"/v1/jobs/{job_id}:done/events").status_code == 404
    bad = api.get(f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": "yesterday"})
    assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["detail"]
    wrong = api.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 0, "preview_every": 2})
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "preview_every"]
    zero = api.post(
        "/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 0, "previews": True, "preview_every": 0}
    )
    assert zero.status_code == 422
    many = api.post(
        "/v1/jobs", json={"num_images": 1, "steps": 1000, "class_label": 0, "previews": True, "preview_every": 9}
    )
    assert many.status_code == 422 and "at least 10 for 1000 steps" in many.json()["detail"][0]["msg"]
    wait_for_status(api, job_id, {"succeeded"})


def test_an_idle_stream_sends_keep_alive_comments(live_api, monkeypatch):
    """A job that waits (database 6: no Worker runs it) keeps its stream open with comment
    lines every KEEPALIVE_S (15 s; 1 s here), which SSE clients ignore."""
    import httpx

    from service.api import jobs

    monkeypatch.setattr(jobs, "KEEPALIVE_S", 1)
    headers = {"Authorization": "Bearer test-key-alice"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=30) as client:
        job_id = client.post("/v1/jobs", json={"num_images": 1, "steps": 2, "class_label": 0}).json()["id"]
        lines = []
        with client.stream("GET", f"/v1/jobs/{job_id}/events") as r:
            for line in r.iter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break
    assert [line for line in lines if line.startswith("event:")] == ["event: queued"]
    [data] = [line for line in lines if line.startswith("data:")]
    assert json.loads(data[5:])["status"] == "queued" and lines[-1].startswith(":")


def test_preview_defaults_and_idempotency_hashes_of_bodies_without_previews_are_unchanged():
    from service.api.params import hashed_body as _hashed_body
    from service.api.schemas import JobCreate
    from service.jobs.events import default_preview_every

    assert [default_preview_every(s) for s in (1, 8, 12, 50, 400)] == [1, 1, 1, 6, 50]
    plain = _hashed_body(JobCreate(num_images=2, class_label=1))
    assert (
        "previews" not in plain and "preview_every" not in plain
    )  # a body without them hashes as if they were never fields
    assert set(plain) == {"model", "num_images", "steps", "sampler", "eta", "seed", "class_label", "guidance_scale"}
    asked = _hashed_body(JobCreate(num_images=2, class_label=1, previews=True))
    assert asked["previews"] is True and asked["preview_every"] is None


def test_open_streams_are_limited_per_key_and_end_after_their_lifetime(live_api, asgi_api):
    """In-process API over HTTP (no Workers: the job stays queued, so its stream stays open):
    with one stream allowed, a second gets 429; the first ends at its lifetime without a
    terminal event, and then a new one is accepted."""
    import time

    import httpx

    from tests.service.conftest import KEY_A

    asgi_api(max_event_streams_per_key=1, event_stream_max_seconds=3)  # the live server's context now
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=30) as client:
        job = client.post("/v1/jobs", json={"num_images": 1, "class_label": 1, "steps": 5}).json()
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as first:
            events = first.iter_sse()
            assert next(events).event == "queued"  # the stream is open and counted
            second = client.get(f"/v1/jobs/{job['id']}/events")
            assert second.status_code == 429 and int(second.headers["Retry-After"]) >= 1
            assert "open event streams" in second.json()["detail"]
            started = time.monotonic()
            rest = [e.event for e in events]  # until the server ends the stream
            assert 1.5 < time.monotonic() - started < 15
            assert not TERMINAL & set(rest)  # ended by its lifetime, not by the job
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as again:
            assert again.response.status_code == 200 and next(again.iter_sse()).event == "queued"


def test_resuming_after_the_terminal_event_ends_the_stream_at_once(live_api, asgi_api):
    """A client that reconnects with the terminal event's id (as EventSource does when a stream
    closes) gets an empty stream that ends, not one that holds the owner's slot until its
    lifetime runs out (900 s here, longer than the client waits)."""
    import httpx

    from tests.service.conftest import KEY_A

    asgi_api(max_event_streams_per_key=1, event_stream_max_seconds=900)
    headers = {"Authorization": f"Bearer {KEY_A}"}
    with httpx.Client(base_url=live_api, headers=headers, timeout=30) as client:
        job = client.post("/v1/jobs", json={"num_images": 1, "class_label": 1, "steps": 5}).json()
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as first:
            events = list(first.iter_sse())
        assert events[-1].event == "canceled"
        last = events[-1].id
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last}) as again:
            assert [e.event for e in again.iter_sse() if e.event] == []  # ended, with nothing after
        # the slot came back: with one stream allowed, a new stream opens
        with connect_sse(client, "GET", f"/v1/jobs/{job['id']}/events") as third:
            assert next(third.iter_sse()).event == "queued"
