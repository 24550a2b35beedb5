"""undiffuse.client without servers: the I/O-free core (requests, retry decisions, the events
state machine, download plans) and both transports over httpx.MockTransport, httpx's own test
transport, answering as the API would."""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import inspect
import json
import random
from pathlib import Path

import httpx
import pytest
import stamina

from undiffuse.client import (
    APIError,
    AsyncClient,
    AuthenticationError,
    ChecksumError,
    Client,
    ConflictError,
    Job,
    NotFoundError,
    Progress,
    RateLimitError,
    UnavailableError,
    ValidationError,
    WaitTimeout,
)
from undiffuse.client import _requests as api
from undiffuse.client._download import DownloadPlan
from undiffuse.client._errors import api_error, parse_retry_after
from undiffuse.client._events import POLL, RECONNECTS, EventFollower, polled_events
from undiffuse.client._retry import RetryPolicy
from undiffuse.client._types import ImageResult

JOB_ID = "0123456789abcdef0123456789abcdef"


class Blocking:
    """An AsyncClient driven from sync code, so that one test body exercises both clients:
    each coroutine method runs to completion on this wrapper's own event loop, and `events`
    becomes a plain iterator."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._loop = asyncio.new_event_loop()

    def __getattr__(self, name: str):
        method = getattr(self._client, name)
        if inspect.isasyncgenfunction(method):

            def iterate(*args, **kwargs):
                stream = method(*args, **kwargs)
                try:
                    while True:
                        try:
                            yield self._loop.run_until_complete(stream.__anext__())
                        except StopAsyncIteration:
                            return
                finally:
                    self._loop.run_until_complete(stream.aclose())

            return iterate
        if inspect.iscoroutinefunction(method):
            return lambda *args, **kwargs: self._loop.run_until_complete(method(*args, **kwargs))
        return method

    def close(self) -> None:
        self._loop.run_until_complete(self._client.close())
        self._loop.close()

    def __enter__(self) -> Blocking:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_client(kind: str, url: str, key: str | None = "k", **kwargs) -> Client | Blocking:
    """A Client, or an AsyncClient behind Blocking: the same calls work on either."""
    return Client(url, key, **kwargs) if kind == "Client" else Blocking(AsyncClient(url, key, **kwargs))


def job_body(status: str = "queued", done: int = 0, **extra) -> dict:
    return {
        "id": JOB_ID,
        "status": status,
        "progress": {"images_done": done, "images_total": 2, "step": 0, "steps": 5},
        "params": {"seed": 1},
        "created_at": 1.0,
        **extra,
    }


# --- requests ---------------------------------------------------------------------------------------


def test_which_requests_may_be_sent_again_after_they_may_have_been_acted_on():
    assert api.get(JOB_ID).idempotent and api.list_jobs(None, 5, None).idempotent
    assert api.delete(JOB_ID).idempotent and api.events(JOB_ID, None).idempotent and api.models().idempotent
    assert api.submit(1, None, {}).idempotent  # it always carries an Idempotency-Key
    assert not api.cancel(JOB_ID).idempotent


def test_a_submission_carries_its_idempotency_key_and_no_unset_fields():
    given = api.submit(3, "nightly-1", {"steps": 7, "seed": None, "class_label": [1, 2, 3]})
    assert given.method == "POST" and given.path == "/v1/jobs"
    assert given.headers == {"Idempotency-Key": "nightly-1"}
    assert given.json == {"num_images": 3, "steps": 7, "class_label": [1, 2, 3]}
    generated = {api.submit(1, None, {}).headers["Idempotency-Key"] for _ in range(3)}
    assert len(generated) == 3 and all(len(k) == 32 for k in generated)


def test_the_event_stream_request_resumes_after_the_last_event_seen():
    assert api.events(JOB_ID, None).headers == {}
    assert api.events(JOB_ID, "17-0").headers == {"Last-Event-ID": "17-0"}


def test_errors_carry_the_servers_message_in_a_class_named_by_the_status():
    detail = {"detail": [{"loc": ["body", "num_images"], "msg": "must be <= 1024"}, {"loc": [], "msg": "and so"}]}
    refused = api_error(422, json.dumps(detail), "Unprocessable Entity")
    assert isinstance(refused, ValidationError) and refused.message == "num_images: must be <= 1024; and so"
    assert isinstance(api_error(404, '{"detail": "job not found"}'), NotFoundError)
    assert isinstance(api_error(401, "{}"), AuthenticationError) and isinstance(api_error(409, "{}"), ConflictError)
    limited = api_error(429, '{"detail": "over the quota"}', retry_after=12.0)
    assert (
        isinstance(limited, RateLimitError)
        and limited.retry_after == 12.0
        and str(limited) == "HTTP 429: over the quota"
    )
    xml = api_error(403, "<Error><Code>AccessDenied</Code></Error>", "Forbidden")
    assert type(xml) is APIError and xml.message.startswith("<Error><Code>AccessDenied")
    assert api_error(502, "", "Bad Gateway").message == "Bad Gateway"


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("5", 5.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None), (None, None), ("", None)],
)
def test_retry_after_in_seconds(header, seconds):
    assert parse_retry_after(header) == seconds


def test_retry_after_as_an_http_date():
    now = 1_800_000_000.0
    ahead = email.utils.formatdate(now + 10, usegmt=True)
    assert parse_retry_after(ahead, now=lambda: now) == pytest.approx(10.0)
    past = email.utils.formatdate(now - 60, usegmt=True)
    assert parse_retry_after(past, now=lambda: now) == 0.0


# --- retry decisions ------------------------------------------------------------------------------------

POLICY = RetryPolicy(attempts=4, base=0.5, cap=8.0, max_retry_after=30.0)


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_the_statuses_that_mean_not_now_are_retried(status):
    assert POLICY.delay(api_error(status, "{}"), 1, idempotent=True) is not None


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500, 501])
def test_other_statuses_are_raised_at_once(status):
    assert POLICY.delay(api_error(status, "{}"), 1, idempotent=True) is None


def test_a_request_that_may_have_been_acted_on_is_retried_only_if_idempotent():
    """cancel is a POST without an Idempotency-Key: a 502 or a dropped connection leaves open
    whether it happened; 408, 429 and 503 say it did not, and a refused connection never sent it."""
    for status in (408, 429, 503):
        assert POLICY.delay(api_error(status, "{}"), 1, idempotent=False) is not None, status
    for status in (502, 504):
        assert POLICY.delay(api_error(status, "{}"), 1, idempotent=False) is None, status
        assert POLICY.delay(api_error(status, "{}"), 1, idempotent=True) is not None, status
    refused, dropped = httpx.ConnectError("refused"), httpx.ReadError("reset")
    assert POLICY.delay(refused, 1, idempotent=False) is not None
    assert POLICY.delay(httpx.ConnectTimeout("slow"), 1, idempotent=False) is not None
    assert POLICY.delay(dropped, 1, idempotent=False) is None
    for error in (dropped, httpx.ReadTimeout("slow"), httpx.RemoteProtocolError("cut"), httpx.WriteError("x")):
        assert POLICY.delay(error, 1, idempotent=True) is not None, error
    assert POLICY.delay(httpx.UnsupportedProtocol("ftp://"), 1, idempotent=True) is None
    assert POLICY.delay(ValueError("a bug"), 1, idempotent=True) is None


def test_retry_after_is_honoured_up_to_a_limit_and_beyond_it_the_error_is_raised():
    assert POLICY.delay(api_error(429, "{}", retry_after=7.0), 1, idempotent=True, rng=lambda: 0.0) == 7.0
    assert POLICY.delay(api_error(503, "{}", retry_after=30.0), 3, idempotent=False) == 30.0
    # a daily quota says "tomorrow": the caller hears it now, with retry_after, instead of 3 waits
    assert POLICY.delay(api_error(429, "{}", retry_after=3600.0), 1, idempotent=True) is None


def test_attempts_bound_the_retries():
    error = api_error(503, "{}")
    assert [POLICY.delay(error, n, idempotent=True) is not None for n in (1, 2, 3, 4, 5)] == [True] * 3 + [False] * 2
    assert RetryPolicy(attempts=1).delay(error, 1, idempotent=True) is None


def test_backoff_is_full_jitter_under_a_doubling_cap():
    assert [POLICY.backoff(n, rng=lambda: 1.0) for n in (1, 2, 3, 4, 5, 6)] == [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]
    assert POLICY.backoff(3, rng=lambda: 0.0) == 0.0
    rng = random.Random(0)
    for n in (1, 3, 5):
        bound = min(8.0, 0.5 * 2 ** (n - 1))
        waits = [POLICY.backoff(n, rng=rng.random) for _ in range(2000)]
        assert all(0 <= w <= bound for w in waits)
        assert min(waits) < 0.05 * bound and max(waits) > 0.95 * bound  # spread over the whole range


def test_the_stamina_hook_counts_its_requests_retries():
    hook = POLICY.hook(idempotent=True)
    error = api_error(503, "{}", retry_after=1.0)
    assert [hook(error) for _ in range(4)] == [1.0, 1.0, 1.0, False]
    assert POLICY.hook(idempotent=True)(api_error(404, "{}")) is False


# --- the events state machine ----------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def follower(timeout: float | None = None, **kwargs) -> tuple[EventFollower, FakeClock]:
    clock = FakeClock()
    return EventFollower(JOB_ID, timeout=timeout, clock=clock, rng=lambda: 1.0, **kwargs), clock


def test_keep_alives_are_no_events_and_each_event_moves_last_event_id():
    follow, _ = follower()
    assert follow.received("message", "", "") is None  # a comment before any id
    queued = follow.received("queued", json.dumps(job_body()), "1-0")
    assert queued.event == "queued" and queued.id == "1-0" and queued.data["id"] == JOB_ID
    # httpx-sse turns a comment after an id into an empty `message` carrying the last id
    assert follow.received("message", "", "1-0") is None
    assert follow.request().headers == {"Last-Event-ID": "1-0"}
    progress = follow.received("progress", '{"step": 2}', "2-0")
    assert progress.data == {"step": 2} and not follow.finished
    assert follow.request().headers == {"Last-Event-ID": "2-0"}
    follow.received("succeeded", json.dumps(job_body("succeeded", 2)), "3-0")
    assert follow.finished


def test_an_event_that_is_not_json_is_an_error():
    follow, _ = follower()
    with pytest.raises(Exception, match="does not carry JSON"):
        follow.received("progress", "{not json", "1-0")


@pytest.mark.parametrize(
    ("status", "content_type", "answer"),
    [
        (200, "text/event-stream; charset=utf-8", "stream"),
        (200, "application/json", POLL),  # something that is no event stream
        (404, "application/json", POLL),  # a server without the route (or no such job: the poll says)
        (405, "text/plain", POLL),
        (429, "application/json", "refused"),
        (503, "application/json", "refused"),
    ],
)
def test_what_the_first_answer_means(status, content_type, answer):
    assert follower()[0].answered(status, content_type) == answer


def test_drops_are_reconnected_with_growing_waits_then_polled():
    follow, _ = follower()
    waits = [follow.next() for _ in range(RECONNECTS)]
    assert waits == [1.0, 2.0, 4.0, 8.0, 8.0]  # the jitter's upper bound (rng = 1)
    assert follow.next() == POLL


def test_an_event_resets_the_reconnect_count():
    follow, _ = follower()
    for _ in range(RECONNECTS):
        follow.next()
    follow.received("progress", '{"step": 1}', "5-0")
    assert follow.next() == 1.0


def test_a_refused_stream_waits_for_retry_after_or_raises():
    follow, _ = follower()
    assert follow.next(api_error(429, "{}", retry_after=2.0)) == 2.0
    with pytest.raises(AuthenticationError):
        follow.next(api_error(401, '{"detail": "unknown key"}'))
    busy, _ = follower()
    unavailable = api_error(503, "{}", retry_after=1.0)
    assert [busy.next(unavailable) for _ in range(3)] == [1.0, 1.0, 1.0]
    with pytest.raises(UnavailableError):  # the retry policy's attempts are spent
        busy.next(unavailable)


def test_drops_do_not_spend_the_refusals_retries():
    """Three drops, then a 503: the refusal still gets its retry (drops and refusals are counted
    apart; both within the reconnect bound)."""
    follow, _ = follower()
    for _ in range(3):
        follow.next()
    assert follow.next(api_error(503, "{}", retry_after=1.0)) == 1.0


def test_no_connect_read_or_wait_outlasts_the_deadline():
    follow, clock = follower(timeout=10)
    assert follow.timeouts() == (10.0, 10.0)
    clock.now += 8.5
    assert follow.timeouts() == (1.5, 1.5)
    assert follow.next() == 1.0
    assert follow.next(api_error(503, "{}", retry_after=5.0)) == 1.5
    clock.now += 0.25
    assert follow.poll_wait() == 0.5
    clock.now += 1.25
    for call in (follow.timeouts, follow.next, follow.poll_wait, lambda: follow.received("message", "", "")):
        with pytest.raises(WaitTimeout, match="did not finish within 10 s"):
            call()


def test_without_a_timeout_the_stream_keeps_its_own_limits():
    follow, clock = follower()
    clock.now += 1e6
    assert follow.timeouts() == (30.0, 90.0) and follow.poll_wait() == 0.5 and follow.left() is None


def job(status: str, step: int, done: int) -> Job:
    return Job(JOB_ID, status, Progress(done, 4, step, 10), {}, 0.0)


def test_polling_reports_what_the_event_stream_would():
    """The fallback for a server without /events: changes between polls become events."""
    first = polled_events(None, job("queued", 0, 0))
    assert [e.event for e in first] == ["queued", "progress"]
    running = polled_events(job("queued", 0, 0), job("running", 3, 0))
    assert [e.event for e in running] == ["started", "progress"] and running[1].data["step"] == 3
    assert polled_events(job("running", 3, 0), job("running", 3, 0)) == []  # nothing changed
    end = polled_events(job("running", 3, 0), job("succeeded", 10, 4))
    assert [e.event for e in end] == ["progress", "succeeded"] and end[-1].terminal
    follow, _ = follower()
    assert [e.event for e in follow.polled(job("running", 3, 0))] == ["queued", "started", "progress"]
    assert follow.polled(job("running", 3, 0)) == [] and not follow.finished
    assert [e.event for e in follow.polled(job("failed", 3, 0))] == ["failed"] and follow.finished


# --- download plans ---------------------------------------------------------------------------------------

PNGS = [b"\x89PNG\r\n\x1a\n" + bytes([i]) * 10 for i in range(3)]
MANIFEST = {
    "job_id": JOB_ID,
    "images": [{"index": i, "seed": i, "key": f"k/{i}", "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
               for i, d in enumerate(PNGS)],
}  # fmt: skip
RESULTS = [ImageResult(i, i, f"k/{i}", f"http://storage.test/k/{i}?sig=x") for i in range(3)]


def test_a_plan_writes_checked_images_and_skips_what_is_already_in_place(tmp_path):
    plan = DownloadPlan(tmp_path / "out", MANIFEST)
    assert [plan.path(r).name for r in RESULTS] == ["00000.png", "00001.png", "00002.png"]
    assert all(plan.needed(r) for r in RESULTS)
    paths = [plan.store(r, d) for r, d in zip(RESULTS, PNGS, strict=True)]
    assert [p.read_bytes() for p in paths] == PNGS
    assert not any(plan.needed(r) for r in RESULTS)
    paths[1].write_bytes(PNGS[2])  # same size, other bytes
    assert plan.needed(RESULTS[1]) and not plan.needed(RESULTS[0])
    done = plan.finish(paths, RESULTS)
    assert done.verified and json.loads(done.manifest.read_text()) == MANIFEST
    assert not list((tmp_path / "out").glob(".*.part"))  # no temporary file left behind


def test_an_image_that_does_not_match_the_manifest_is_not_written(tmp_path):
    plan = DownloadPlan(tmp_path, MANIFEST)
    with pytest.raises(ChecksumError, match=r"00001.png: 18 bytes with SHA-256 .*the manifest says 18 bytes"):
        plan.store(RESULTS[1], PNGS[0])
    assert not plan.path(RESULTS[1]).exists()
    with pytest.raises(ChecksumError, match="its manifest does not"):
        plan.store(ImageResult(7, 7, "k/7", "u"), PNGS[0])
    with pytest.raises(ChecksumError, match=r"lists images the job does not: \[2\]"):
        plan.finish([], RESULTS[:2])


def test_without_a_manifest_nothing_is_checked_or_claimed(tmp_path):
    plan = DownloadPlan(tmp_path, None)
    path = plan.store(RESULTS[0], b"anything")
    done = plan.finish([path], RESULTS[:1])
    assert path.read_bytes() == b"anything" and not done.verified and done.manifest is None


# --- both clients, one surface -----------------------------------------------------------------------------


def test_the_async_client_has_every_method_of_the_sync_client_with_the_same_parameters():
    def public(cls) -> dict[str, inspect.Signature]:
        return {n: inspect.signature(m) for n, m in vars(cls).items() if callable(m) and not n.startswith("_")}

    sync, asynchronous = public(Client), public(AsyncClient)
    assert sync.keys() == asynchronous.keys()
    for name, signature in sync.items():
        assert list(signature.parameters) == list(asynchronous[name].parameters), name
        for p, q in zip(signature.parameters.values(), asynchronous[name].parameters.values(), strict=True):
            assert (p.kind, p.default) == (q.kind, q.default), f"{name}({p.name})"
        method = getattr(AsyncClient, name)
        assert inspect.iscoroutinefunction(method) or inspect.isasyncgenfunction(method), name
    assert {"models", "webhook_secret", "archive", "events", "download"} <= asynchronous.keys()
    assert "timeout" in asynchronous["events"].parameters and "on_image" in asynchronous["download"].parameters


# --- the transports over httpx.MockTransport -----------------------------------------------------------------


class Server:
    """Answers from a script: each request takes the next answer (a response, or an exception
    to raise as the connection would), and is recorded."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self)


@pytest.fixture(params=["Client", "AsyncClient"])
def kind(request) -> str:
    return request.param


@pytest.fixture
def no_backoff():
    """stamina's testing mode: the waits are 0 (the decisions are this file's other tests)."""
    with stamina.set_testing(True, attempts=10, cap=True):
        yield


def test_a_429_is_retried_after_its_retry_after(kind):
    waits = []
    stamina.instrumentation.set_on_retry_hooks([lambda details: waits.append(details.wait_for)])
    server = Server(
        httpx.Response(429, json={"detail": "too many reads"}, headers={"Retry-After": "1"}),
        httpx.Response(200, json={"models": [{"name": "mnist"}]}),
    )
    try:
        with open_client(kind, "http://api.test", transport=server.transport()) as client:
            assert client.models() == [{"name": "mnist"}]
    finally:
        stamina.instrumentation.set_on_retry_hooks(None)
    assert len(server.requests) == 2 and waits == [pytest.approx(1.0, abs=0.05)]


def test_gateway_errors_and_dropped_connections_are_retried_for_a_read(kind, no_backoff):
    server = Server(
        httpx.Response(502),
        httpx.ReadError("connection reset"),
        httpx.Response(504),
        httpx.Response(200, json=job_body("running")),
    )
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        assert client.get(JOB_ID).status == "running"
    assert len(server.requests) == 4


def test_a_submission_is_retried_with_its_one_idempotency_key(kind, no_backoff):
    server = Server(httpx.Response(503, json={"detail": "Redis is away"}), httpx.Response(202, json=job_body()))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        assert client.submit(2, class_label=3).id == JOB_ID
    keys = {r.headers["Idempotency-Key"] for r in server.requests}
    assert len(server.requests) == 2 and len(keys) == 1
    assert all(json.loads(r.content) == {"num_images": 2, "class_label": 3} for r in server.requests)


def test_cancel_is_not_sent_again_when_it_may_have_happened(kind, no_backoff):
    server = Server(httpx.Response(502))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        with pytest.raises(APIError) as failed:
            client.cancel(JOB_ID)
        assert failed.value.status_code == 502 and len(server.requests) == 1
        server.answers = [httpx.ReadError("reset")]
        with pytest.raises(httpx.ReadError):
            client.cancel(JOB_ID)
        assert len(server.requests) == 2
        server.answers = [httpx.Response(503), httpx.ConnectError("refused"), httpx.Response(200, json=job_body())]
        assert client.cancel(JOB_ID).id == JOB_ID  # neither of those reached the job
        assert len(server.requests) == 5


def test_a_refusal_is_raised_at_once_and_retries_end(kind, no_backoff):
    server = Server(httpx.Response(404, json={"detail": "job not found"}))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        with pytest.raises(NotFoundError, match="job not found"):
            client.get(JOB_ID)
        assert len(server.requests) == 1
        server.answers = [httpx.Response(503, json={"detail": "away"})] * 4
        with pytest.raises(UnavailableError, match="away"):
            client.list()
        assert len(server.requests) == 5  # the first send and 3 retries
    server = Server(httpx.Response(503))
    with open_client(kind, "http://api.test", retries=0, transport=server.transport()) as client:
        with pytest.raises(UnavailableError):
            client.models()
    assert len(server.requests) == 1


def sse(*events: tuple[str, str, dict] | str) -> bytes:
    """An event stream: (id, event, data) triples and raw lines (keep-alive comments)."""
    out = []
    for e in events:
        out.append(e if isinstance(e, str) else f"id: {e[0]}\nevent: {e[1]}\ndata: {json.dumps(e[2])}\n\n")
    return "".join(out).encode()


def stream_response(body: bytes) -> httpx.Response:
    return httpx.Response(200, content=body, headers={"content-type": "text/event-stream; charset=utf-8"})


def test_events_skip_keep_alives_and_resume_after_a_drop_with_last_event_id(kind):
    first = sse(
        ": ping - 1\n\n", ("1-0", "queued", job_body()), ": ping - 2\n\n", ("2-0", "started", {"status": "running"})
    )
    rest = sse(": ping - 3\n\n", ("3-0", "progress", {"step": 5}), ("4-0", "succeeded", job_body("succeeded", 2)))
    server = Server(stream_response(first), stream_response(rest))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        events = list(client.events(JOB_ID))
    assert [(e.id, e.event) for e in events] == [("1-0", "queued"), ("2-0", "started"), ("3-0", "progress"), ("4-0", "succeeded")]  # fmt: skip
    assert "last-event-id" not in server.requests[0].headers
    assert server.requests[1].headers["Last-Event-ID"] == "2-0"


def test_events_are_polled_from_a_server_without_the_stream(kind):
    server = Server(
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(200, json=job_body("running")),
        httpx.Response(200, json=job_body("succeeded", 2)),
    )
    seen = []
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        server.answers.append(httpx.Response(200, json=job_body("succeeded", 2)))  # what wait() returns
        done = client.wait(JOB_ID, on_event=seen.append, timeout=30)
    assert done.status == "succeeded"
    assert [e.event for e in seen] == ["queued", "started", "progress", "progress", "succeeded"]
    assert [r.url.path for r in server.requests][1:] == [f"/v1/jobs/{JOB_ID}"] * 3


def test_download_fetches_checks_and_reports_each_image(kind, tmp_path):
    answers = {
        f"/v1/jobs/{JOB_ID}": job_body("succeeded", 3, manifest_url="http://storage.test/manifest.json",
                                       results=[vars(r) for r in RESULTS]),
        "/manifest.json": MANIFEST,
    }  # fmt: skip
    seen_keys = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen_keys.append((request.url.host, request.headers.get("authorization")))
        if request.url.path.startswith("/k/"):
            return httpx.Response(200, content=PNGS[int(request.url.path.rsplit("/", 1)[1])])
        return httpx.Response(200, json=answers[request.url.path])

    reported = []
    with open_client(kind, "http://api.test", transport=httpx.MockTransport(handle)) as client:
        done = client.download(JOB_ID, tmp_path, concurrency=2, on_image=reported.append)
    assert done.verified and [p.read_bytes() for p in done.images] == PNGS
    assert sorted(p.name for p in reported) == ["00000.png", "00001.png", "00002.png"]
    assert {key for host, key in seen_keys if host == "storage.test"} == {None}  # the key stays with the API
    assert {key for host, key in seen_keys if host == "api.test"} == {"Bearer k"}


def test_download_refuses_a_job_that_has_not_succeeded(kind, tmp_path):
    server = Server(httpx.Response(200, json=job_body("running")))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        with pytest.raises(ConflictError, match="is running"):
            client.download(JOB_ID, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_archive_is_renamed_into_place_only_when_whole(kind, tmp_path):
    body = b"PK\x03\x04" + b"z" * 100
    server = Server(httpx.Response(200, content=body))
    target = tmp_path / "job.zip"
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        assert client.archive(JOB_ID, target) == len(body)
        assert target.read_bytes() == body and not Path(f"{target}.part").exists()
        short = httpx.Response(200, content=body[:50], headers={"content-length": str(len(body))})
        server.answers = [short]
        with pytest.raises(ChecksumError, match=f"50 of {len(body)} bytes"):
            client.archive(JOB_ID, tmp_path / "short.zip")
    assert not (tmp_path / "short.zip").exists() and not (tmp_path / "short.zip.part").exists()


def test_downloaded_files_take_the_suffix_the_service_stored_them_with(tmp_path):
    plan = DownloadPlan(tmp_path, None)
    for key, name in (
        ("jobs/j/00003.webp", "00003.webp"),
        ("jobs/j/00003.jpg", "00003.jpg"),
        ("jobs/j/00003.png", "00003.png"),
    ):
        assert plan.path(ImageResult(index=3, seed=0, key=key, url="u")).name == name


def test_a_delete_resent_after_a_lost_answer_is_done_when_the_job_is_gone(kind, no_backoff):
    """The first DELETE may have been carried out (its connection dropped mid-answer): the resend's
    404 means it was, so delete() succeeds. A 404 to the first send is still NotFoundError."""
    from undiffuse.client import NotFoundError

    server = Server(httpx.ReadError("connection reset"), httpx.Response(404, json={"detail": "job not found"}))
    with open_client(kind, "http://api.test", transport=server.transport()) as client:
        assert client.delete(JOB_ID) is None
    assert [r.method for r in server.requests] == ["DELETE", "DELETE"]
    never = Server(httpx.Response(404, json={"detail": "job not found"}))
    with open_client(kind, "http://api.test", transport=never.transport()) as client, pytest.raises(NotFoundError):
        client.delete(JOB_ID)
    refused = Server(httpx.ConnectError("refused"), httpx.Response(404, json={"detail": "job not found"}))
    with open_client(kind, "http://api.test", transport=refused.transport()) as client, pytest.raises(NotFoundError):
        client.delete(JOB_ID)  # the first send never left: the 404 is the answer
