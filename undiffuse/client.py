"""A Python client for the undiffuse HTTP API: `Client` (sync) and `AsyncClient`, on httpx.

    from undiffuse.client import Client

    with Client("http://127.0.0.1:8000", api_key="ud_...") as api:
        job = api.submit(num_images=8, class_label=7, steps=50)
        job = api.wait(job.id, on_event=lambda e: print(e.event, e.data))
        files = api.download(job.id, "sevens/")  # checked against the job's manifest

`wait` follows the job's server-sent events (GET /v1/jobs/{id}/events), reconnecting with
Last-Event-ID when the connection drops, and falls back to polling GET /v1/jobs/{id} against a
server without the event stream. `download` fetches the presigned URLs concurrently (without the
API key: it never leaves for the storage host), writes each file atomically, skips files already
there with the right checksum, and verifies every image's SHA-256 and size against the job's
manifest.json. Errors are raised with the server's own message (`APIError` and subclasses).

Light on purpose: httpx and httpx-sse only, no torch, so scripts and the CLI's client commands
start fast.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse, connect_sse

DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL = ("succeeded", "failed", "canceled")
RESULTS_PAGE = 1024  # the server's largest results page
_STREAM_TIMEOUT = httpx.Timeout(30.0, read=90.0)  # keep-alive comments arrive every ~15 s
_RECONNECTS = 5  # event-stream reconnects in a row before falling back to polling
_RETRIES_503 = 3  # retries of a request answered 503 + Retry-After (Redis failover, S3 away)
_MAX_RETRY_AFTER = 30.0


# --- errors -------------------------------------------------------------------------------------


class UndiffuseError(Exception):
    """Anything this client raises on purpose."""


class APIError(UndiffuseError):
    """The server answered with an error status; `message` is its own explanation."""

    def __init__(self, status_code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


class AuthenticationError(APIError):
    """401: no key, or a key the server does not know."""


class NotFoundError(APIError):
    """404: no such job for this key."""


class ConflictError(APIError):
    """409: e.g. cancel a finished job, delete an active one, an archive of an unfinished one."""


class ValidationError(APIError):
    """422: a field's value was refused; the message names the field and the reason."""


class RateLimitError(APIError):
    """429: over a per-key quota; retry after `retry_after` seconds."""


class UnavailableError(APIError):
    """503: a dependency (Redis, S3) is away; nothing was lost, retry after `retry_after`."""


class ChecksumError(UndiffuseError):
    """A downloaded image does not match the SHA-256 or size in the job's manifest."""


class WaitTimeout(UndiffuseError, TimeoutError):
    """`wait` gave up before the job finished (the job goes on running)."""


_ERRORS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
    503: UnavailableError,
}


def _message(response: httpx.Response) -> str:
    """The server's explanation: FastAPI's `detail` (a string, or field errors as 'loc: msg')."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text.strip()[:300] or response.reason_phrase
    if isinstance(detail, list):  # 422: [{"loc": ["body", "num_images"], "msg": "..."}]
        parts = []
        for item in detail:
            loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
            parts.append(f"{'.'.join(loc)}: {item.get('msg', '')}" if loc else str(item.get("msg", "")))
        return "; ".join(parts)
    return str(detail)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    cls = _ERRORS.get(response.status_code, APIError)
    raise cls(response.status_code, _message(response), _retry_after(response))


def _retry_delay(response: httpx.Response, attempt: int) -> float | None:
    """Seconds to wait before retrying a 503, or None to give up."""
    if response.status_code != 503 or attempt >= _RETRIES_503:
        return None
    return min(_retry_after(response) or 1.0, _MAX_RETRY_AFTER)


# --- typed results --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Progress:
    images_done: int
    images_total: int
    step: int
    steps: int


@dataclass(frozen=True)
class ImageResult:
    index: int
    seed: int
    key: str
    url: str


@dataclass(frozen=True)
class Job:
    """A job as GET /v1/jobs/{id} shows it. `results` is one page (see `Client.results`)."""

    id: str
    status: str
    progress: Progress
    params: dict[str, Any]
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    error: dict[str, str] | None = None
    results: list[ImageResult] = field(default_factory=list)
    results_next_offset: int | None = None
    manifest_url: str | None = None
    queue: dict[str, Any] | None = None  # while queued: ahead_row_steps, estimated_start_seconds / _at

    @property
    def done(self) -> bool:
        return self.status in TERMINAL

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Job:
        return cls(
            id=body["id"],
            status=body["status"],
            progress=Progress(**body["progress"]),
            params=body.get("params", {}),
            created_at=body["created_at"],
            started_at=body.get("started_at"),
            finished_at=body.get("finished_at"),
            error=body.get("error"),
            results=[
                ImageResult(**{k: r[k] for k in ("index", "seed", "key", "url")}) for r in body.get("results", [])
            ],
            results_next_offset=body.get("results_next_offset"),
            manifest_url=body.get("manifest_url"),
            queue=body.get("queue"),
        )


@dataclass(frozen=True)
class JobSummary:
    id: str
    status: str
    progress: Progress
    created_at: float
    finished_at: float | None = None


@dataclass(frozen=True)
class JobPage:
    jobs: list[JobSummary]
    next_cursor: str | None


@dataclass(frozen=True)
class JobEvent:
    """One event of a job: `event` is queued, started, progress, preview, succeeded, failed or
    canceled; `data` its JSON; `id` what Last-Event-ID resumes after (None for polled events)."""

    event: str
    data: dict[str, Any]
    id: str | None = None

    @property
    def terminal(self) -> bool:
        return self.event in TERMINAL


def _page(body: dict[str, Any]) -> JobPage:
    jobs = [
        JobSummary(j["id"], j["status"], Progress(**j["progress"]), j["created_at"], j.get("finished_at"))
        for j in body["jobs"]
    ]
    return JobPage(jobs, body.get("next_cursor"))


def _submit_body(num_images: int, params: dict[str, Any]) -> dict[str, Any]:
    return {"num_images": num_images, **{k: v for k, v in params.items() if v is not None}}


def _polled_events(before: Job | None, now: Job) -> list[JobEvent]:
    """What changed between two polls, as the event stream would have said it."""
    events = []
    if before is None:
        events.append(JobEvent("queued", _job_json(now)))
    if now.status != "queued" and (before is None or before.status == "queued"):
        events.append(JobEvent("started", {"status": "running"}))
    if before is None or now.progress != before.progress:
        events.append(JobEvent("progress", vars(now.progress)))
    if now.done:
        events.append(JobEvent(now.status, _job_json(now)))
    return events


def _job_json(job: Job) -> dict[str, Any]:
    body = {k: v for k, v in vars(job).items() if k not in ("progress", "results")}
    body["progress"] = vars(job.progress)
    body["results"] = [vars(r) for r in job.results]
    return body


class _EventParser:
    """text/event-stream framing (WHATWG HTML, "Interpreting an event stream"), one line at a
    time. A comment line (the server's keep-alive, `: ping`) and a blank line without data
    dispatch nothing: httpx-sse's iter_sse (0.4) turns every keep-alive after the first id into
    an empty `message` event, which would reach `on_event` as a job event."""

    def __init__(self) -> None:
        self._event, self._data, self._id = "", [], None

    def feed(self, line: str) -> JobEvent | None:
        if not line:  # the end of an event
            event, data, event_id = self._event or "message", "\n".join(self._data), self._id
            self._event, self._data, self._id = "", [], None
            return JobEvent(event, json.loads(data), event_id or None) if data else None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        return None


# --- downloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    """What `download` wrote: the images (by index) and whether the manifest checked them."""

    directory: Path
    images: list[Path]
    manifest: Path | None
    verified: bool


def _image_name(index: int) -> str:
    return f"{index:05d}.png"


def _check(data: bytes, manifest: dict[str, Any] | None, entry: dict[str, Any] | None, name: str) -> None:
    """Raise ChecksumError unless data is what the manifest lists (nothing to check without one)."""
    if manifest is None:
        return
    if entry is None:
        raise ChecksumError(f"{name}: the job lists it, its manifest does not")
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise ChecksumError(
            f"{name}: {len(data)} bytes with SHA-256 {hashlib.sha256(data).hexdigest()[:16]}…, "
            f"the manifest says {entry['size']} bytes and {entry['sha256'][:16]}…"
        )


def _already_there(path: Path, entry: dict[str, Any] | None) -> bool:
    """A file from an earlier download that the manifest vouches for (skipped, not fetched)."""
    if entry is None or not path.is_file() or path.stat().st_size != entry["size"]:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _manifest_entries(manifest: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    return {int(e["index"]): e for e in manifest["images"]} if manifest else {}


def _endpoint(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The service's base URL and the API's headers: arguments, else $UNDIFFUSE_URL and
    $UNDIFFUSE_API_KEY, else the local stack without a key."""
    base = (url or os.environ.get("UNDIFFUSE_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("UNDIFFUSE_API_KEY")
    return base, ({"Authorization": f"Bearer {key}"} if key else {})


# --- the sync client -------------------------------------------------------------------------------


class Client:
    """The undiffuse API over HTTP. `url` and `api_key` default to $UNDIFFUSE_URL and
    $UNDIFFUSE_API_KEY. Use as a context manager, or call close()."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, headers = _endpoint(url, api_key)
        self._http = httpx.Client(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport or httpx.HTTPTransport(retries=2),  # connect errors only
        )
        self._storage = httpx.Client(timeout=timeout, transport=httpx.HTTPTransport(retries=2))  # no API key

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._storage.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(method, path, **kwargs)
            delay = _retry_delay(response, attempt)
            if delay is None:
                _raise_for(response)
                return response
            time.sleep(delay)
            attempt += 1

    # -- jobs

    def submit(self, num_images: int = 1, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """POST /v1/jobs. params: model, steps, sampler, eta, seed, class_label, guidance_scale,
        previews, ... (README). An Idempotency-Key (generated when not given) makes the retries
        after a 503 or a dropped connection safe: the server answers with the one job."""
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        body = _submit_body(num_images, params)
        return Job.from_json(self._request("POST", "/v1/jobs", json=body, headers=headers).json())

    def get(self, job_id: str, *, results_offset: int = 0, results_limit: int = RESULTS_PAGE) -> Job:
        params = {"results_offset": results_offset, "results_limit": results_limit}
        return Job.from_json(self._request("GET", f"/v1/jobs/{job_id}", params=params).json())

    def results(self, job_id: str) -> list[ImageResult]:
        """Every result of the job, through every page."""
        results, offset = [], 0
        while offset is not None:
            job = self.get(job_id, results_offset=offset)
            results.extend(job.results)
            offset = job.results_next_offset
        return results

    def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return _page(self._request("GET", "/v1/jobs", params=params).json())

    def cancel(self, job_id: str) -> Job:
        return Job.from_json(self._request("POST", f"/v1/jobs/{job_id}/cancel").json())

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def models(self) -> list[dict[str, Any]]:
        return self._request("GET", "/v1/models").json()["models"]

    def webhook_secret(self) -> str:
        """The secret that signs this owner's webhook deliveries (GET /v1/webhook-secret)."""
        return self._request("GET", "/v1/webhook-secret").json()["secret"]

    def archive(self, job_id: str, path: str | Path) -> int:
        """A succeeded job's ZIP (its PNGs and manifest.json) streamed to `path`; returns its
        size. Written beside it first and renamed when complete, so `path` is never partial."""
        path = Path(path)
        partial = path.with_name(path.name + ".part")
        with self._http.stream("GET", f"/v1/jobs/{job_id}/archive") as response:
            if response.status_code != 200:
                response.read()
                _raise_for(response)
            size = 0
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes():
                    out.write(chunk)
                    size += len(chunk)
        expected = response.headers.get("content-length")
        if expected is not None and int(expected) != size:
            partial.unlink(missing_ok=True)
            raise ChecksumError(f"archive of job {job_id}: {size} of {expected} bytes arrived")
        partial.replace(path)
        return size

    # -- watching

    def events(
        self, job_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """The job's events until its terminal one, reconnecting with Last-Event-ID if the
        connection drops; polls instead against a server without the event stream. With
        `timeout`, raises WaitTimeout once that many seconds have passed, also while the stream
        carries nothing but keep-alive comments (a queued job)."""
        deadline = None if timeout is None else time.monotonic() + timeout

        def left() -> float:
            """Seconds to the deadline (WaitTimeout once it has passed)."""
            if deadline is None:
                return _STREAM_TIMEOUT.read or 90.0
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeout(f"job {job_id} did not finish within {timeout:g} s")
            return remaining

        reconnects = 0
        while True:
            try:
                headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
                # no read outlasts the deadline: an idle stream's next keep-alive may be 15 s off
                limit = httpx.Timeout(min(30.0, left()), read=min(_STREAM_TIMEOUT.read or 90.0, left()))
                with connect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=limit
                ) as source:
                    if not self._has_stream(job_id, source.response):
                        yield from self._poll(job_id, left=left)
                        return
                    parser = _EventParser()
                    for line in source.response.iter_lines():
                        left()  # every line, keep-alive comments included
                        event = parser.feed(line)
                        if event is None:
                            continue
                        last_event_id = event.id or last_event_id
                        reconnects = 0
                        yield event
                        if event.terminal:
                            return
            except (httpx.TransportError, SSEError):
                pass
            reconnects += 1  # the stream ended or dropped before the terminal event
            if reconnects > _RECONNECTS:
                yield from self._poll(job_id, left=left)
                return
            time.sleep(min(0.5 * 2**reconnects, 8.0, left()))

    def _has_stream(self, job_id: str, response: httpx.Response) -> bool:
        if response.is_success and response.headers.get("content-type", "").startswith("text/event-stream"):
            return True
        if response.status_code in (404, 405):
            response.read()
            self.get(job_id)  # raises NotFoundError if the job itself is unknown
            return False  # the job exists, the route does not: an older server
        response.read()
        _raise_for(response)
        return False

    def _poll(self, job_id: str, interval: float = 0.5, left: Callable[[], float] | None = None) -> Iterator[JobEvent]:
        before = None
        while True:
            job = self.get(job_id, results_limit=1)
            yield from _polled_events(before, job)
            if job.done:
                return
            before = job
            time.sleep(min(interval, left()) if left else interval)

    def wait(
        self, job_id: str, *, on_event: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> Job:
        """Follow the job until it succeeds, fails or is canceled, and return it (its first page
        of results). `on_event` sees every event on the way. Raises WaitTimeout after `timeout`
        seconds, whether or not events arrive meanwhile."""
        for event in self.events(job_id, timeout=timeout):
            if on_event:
                on_event(event)
            if event.terminal:
                return self.get(job_id)
        return self.get(job_id)

    # -- downloading

    def manifest(self, job: Job) -> dict[str, Any] | None:
        """The job's manifest.json (per image: index, seed, key, sha256, size), or None when the
        server publishes none."""
        if not job.manifest_url:
            return None
        response = self._storage.get(job.manifest_url)
        _raise_for(response)
        return response.json()

    def download(
        self,
        job_id: str,
        directory: str | Path,
        *,
        concurrency: int = 8,
        on_image: Callable[[Path], None] | None = None,
    ) -> Download:
        """Write every image of a succeeded job to directory/NNNNN.png and its manifest.json."""
        job = self.get(job_id, results_limit=1)
        if job.status != "succeeded":
            raise ConflictError(409, f"job {job_id} is {job.status}: only a succeeded job has images to download")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest(job)
        entries = _manifest_entries(manifest)

        def fetch(result: ImageResult) -> Path:
            path = out / _image_name(result.index)
            entry = entries.get(result.index)
            if not _already_there(path, entry):
                response = self._storage.get(result.url)
                _raise_for(response)
                _check(response.content, manifest, entry, path.name)
                _write_atomically(path, response.content)
            if on_image:
                on_image(path)
            return path

        results = self.results(job_id)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            paths = list(pool.map(fetch, results))
        return _finish_download(out, paths, results, manifest)


def _finish_download(
    out: Path, paths: list[Path], results: list[ImageResult], manifest: dict[str, Any] | None
) -> Download:
    if manifest is None:
        return Download(out, paths, None, verified=False)
    missing = sorted(set(_manifest_entries(manifest)) - {r.index for r in results})
    if missing:
        raise ChecksumError(f"the manifest lists images the job does not: {missing[:5]}")
    manifest_path = out / "manifest.json"
    _write_atomically(manifest_path, json.dumps(manifest, indent=2).encode())
    return Download(out, paths, manifest_path, verified=True)


# --- the async client ------------------------------------------------------------------------------


class AsyncClient:
    """The same API for asyncio code: every method of `Client`, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, headers = _endpoint(url, api_key)
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=headers,
            timeout=timeout,
            transport=transport or httpx.AsyncHTTPTransport(retries=2),
        )
        self._storage = httpx.AsyncClient(timeout=timeout, transport=httpx.AsyncHTTPTransport(retries=2))

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        await self._storage.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(method, path, **kwargs)
            delay = _retry_delay(response, attempt)
            if delay is None:
                _raise_for(response)
                return response
            await asyncio.sleep(delay)
            attempt += 1

    async def submit(self, num_images: int = 1, *, idempotency_key: str | None = None, **params: Any) -> Job:
        headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
        response = await self._request("POST", "/v1/jobs", json=_submit_body(num_images, params), headers=headers)
        return Job.from_json(response.json())

    async def get(self, job_id: str, *, results_offset: int = 0, results_limit: int = RESULTS_PAGE) -> Job:
        params = {"results_offset": results_offset, "results_limit": results_limit}
        return Job.from_json((await self._request("GET", f"/v1/jobs/{job_id}", params=params)).json())

    async def results(self, job_id: str) -> list[ImageResult]:
        results, offset = [], 0
        while offset is not None:
            job = await self.get(job_id, results_offset=offset)
            results.extend(job.results)
            offset = job.results_next_offset
        return results

    async def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
        return _page((await self._request("GET", "/v1/jobs", params=params)).json())

    async def cancel(self, job_id: str) -> Job:
        return Job.from_json((await self._request("POST", f"/v1/jobs/{job_id}/cancel")).json())

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/v1/jobs/{job_id}")

    async def events(self, job_id: str, last_event_id: str | None = None) -> AsyncIterator[JobEvent]:
        reconnects = 0
        while True:
            try:
                headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
                async with aconnect_sse(
                    self._http, "GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=_STREAM_TIMEOUT
                ) as source:
                    if not await self._has_stream(job_id, source.response):
                        async for event in self._poll(job_id):
                            yield event
                        return
                    parser = _EventParser()
                    async for line in source.response.aiter_lines():
                        event = parser.feed(line)
                        if event is None:
                            continue
                        last_event_id = event.id or last_event_id
                        reconnects = 0
                        yield event
                        if event.terminal:
                            return
            except (httpx.TransportError, SSEError):
                pass
            reconnects += 1
            if reconnects > _RECONNECTS:
                async for event in self._poll(job_id):
                    yield event
                return
            await asyncio.sleep(min(0.5 * 2**reconnects, 8.0))

    async def _has_stream(self, job_id: str, response: httpx.Response) -> bool:
        if response.is_success and response.headers.get("content-type", "").startswith("text/event-stream"):
            return True
        await response.aread()
        if response.status_code in (404, 405):
            await self.get(job_id)
            return False
        _raise_for(response)
        return False

    async def _poll(self, job_id: str, interval: float = 0.5) -> AsyncIterator[JobEvent]:
        before = None
        while True:
            job = await self.get(job_id, results_limit=1)
            for event in _polled_events(before, job):
                yield event
            if job.done:
                return
            before = job
            await asyncio.sleep(interval)

    async def wait(
        self, job_id: str, *, on_event: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> Job:
        async def follow() -> None:
            async for event in self.events(job_id):
                if on_event:
                    on_event(event)
                if event.terminal:
                    return

        try:
            await asyncio.wait_for(follow(), timeout)
        except asyncio.TimeoutError:
            raise WaitTimeout(f"job {job_id} did not finish within {timeout:g} s") from None
        return await self.get(job_id)

    async def manifest(self, job: Job) -> dict[str, Any] | None:
        if not job.manifest_url:
            return None
        response = await self._storage.get(job.manifest_url)
        _raise_for(response)
        return response.json()

    async def download(self, job_id: str, directory: str | Path, *, concurrency: int = 8) -> Download:
        job = await self.get(job_id, results_limit=1)
        if job.status != "succeeded":
            raise ConflictError(409, f"job {job_id} is {job.status}: only a succeeded job has images to download")
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        manifest = await self.manifest(job)
        entries = _manifest_entries(manifest)
        gate = asyncio.Semaphore(max(1, concurrency))

        async def fetch(result: ImageResult) -> Path:
            path = out / _image_name(result.index)
            entry = entries.get(result.index)
            if not _already_there(path, entry):
                async with gate:
                    response = await self._storage.get(result.url)
                _raise_for(response)
                _check(response.content, manifest, entry, path.name)
                _write_atomically(path, response.content)
            return path

        results = await self.results(job_id)
        paths = list(await asyncio.gather(*(fetch(r) for r in results)))
        return _finish_download(out, paths, results, manifest)
