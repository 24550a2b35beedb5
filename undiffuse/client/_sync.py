"""`Client`: the API over httpx's blocking client. Requests, retry decisions, the events state
machine and the download plan come from the I/O-free modules beside it; this class sends."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, connect_sse

from undiffuse.client import _requests as api
from undiffuse.client._download import ArchiveFile, DownloadPlan, require_succeeded
from undiffuse.client._errors import response_error
from undiffuse.client._events import POLL, EventFollower
from undiffuse.client._requests import RESULTS_PAGE, ApiRequest, endpoint
from undiffuse.client._retry import done_by_an_earlier_send, may_have_acted, policy
from undiffuse.client._types import Download, ImageResult, Job, JobEvent, JobPage


def _raise_for(response: httpx.Response) -> None:
    error = response_error(response)
    if error is not None:
        raise error


class Client:
    """The undiffuse API over HTTP. `url` and `api_key` default to $UNDIFFUSE_URL and
    $UNDIFFUSE_API_KEY. `retries`: how often a failed request is sent again (undiffuse.client
    says which failures). `transport` replaces httpx's for the API and the storage host alike.
    Use as a context manager, or call close()."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url, headers = endpoint(url, api_key)
        self._policy = policy(retries)
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._storage = httpx.Client(timeout=timeout, transport=transport)  # no API key

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()
        self._storage.close()

    def _send(self, request: ApiRequest, http: httpx.Client | None = None) -> httpx.Response:
        acted = False  # an earlier send may have been carried out
        for attempt in self._policy.retrying(request.idempotent):
            with attempt:
                try:
                    response = (http or self._http).request(
                        request.method,
                        request.path,
                        params=request.params or None,
                        json=request.json,
                        headers=request.headers or None,
                    )
                    if done_by_an_earlier_send(request.gone_means_done, acted, response.status_code):
                        return response
                    _raise_for(response)
                except Exception as e:
                    acted = acted or may_have_acted(e)
                    raise
        return response

    def _call(self, request: ApiRequest) -> Any:
        response = self._send(request)
        return request.parse(response.json() if request.has_body else None)

    # -- jobs

    def submit(self, num_images: int = 1, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """POST /v1/jobs. params: model, steps, sampler, eta, seed, class_label, guidance_scale,
        previews, ... (README). An Idempotency-Key (generated when not given) makes the retries
        after a 503 or a dropped connection safe: the server answers with the one job."""
        return self._call(api.submit(num_images, idempotency_key, params))

    def get(self, job_id: str, *, results_offset: int = 0, results_limit: int = RESULTS_PAGE) -> Job:
        return self._call(api.get(job_id, results_offset, results_limit))

    def results(self, job_id: str) -> list[ImageResult]:
        """Every result of the job, through every page."""
        results: list[ImageResult] = []
        offset: int | None = 0
        while offset is not None:
            job = self.get(job_id, results_offset=offset)
            results.extend(job.results)
            offset = job.results_next_offset
        return results

    def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        return self._call(api.list_jobs(status, limit, cursor))

    def cancel(self, job_id: str) -> Job:
        return self._call(api.cancel(job_id))

    def delete(self, job_id: str) -> None:
        self._call(api.delete(job_id))

    def models(self) -> list[dict[str, Any]]:
        return self._call(api.models())

    def webhook_secret(self) -> str:
        """The secret that signs this owner's webhook deliveries (GET /v1/webhook-secret)."""
        return self._call(api.webhook_secret())

    def archive(self, job_id: str, path: str | Path) -> int:
        """A succeeded job's ZIP (its PNGs and manifest.json) streamed to `path`; returns its
        size. Written beside it first and renamed when complete, so `path` is never partial."""
        request, file = api.archive(job_id), ArchiveFile(path, job_id)
        for attempt in self._policy.retrying(request.idempotent):
            with attempt, self._http.stream(request.method, request.path) as response:
                if not response.is_success:
                    response.read()
                    _raise_for(response)
                with file.open() as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                        file.wrote(chunk)
        return file.finish(response.headers.get("content-length"))

    # -- watching

    def events(
        self, job_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> Iterator[JobEvent]:
        """The job's events until its terminal one, reconnecting with Last-Event-ID if the
        connection drops; polls instead against a server without the event stream. With
        `timeout`, raises WaitTimeout once that many seconds have passed, also while the stream
        carries nothing but keep-alive comments (a queued job)."""
        follow = EventFollower(job_id, last_event_id, timeout, policy=self._policy)
        while True:
            answer, refusal = "dropped", None
            try:
                request = follow.request()
                connect, read = follow.timeouts()
                limits = httpx.Timeout(connect, read=read)
                with connect_sse(
                    self._http, request.method, request.path, headers=request.headers, timeout=limits
                ) as source:
                    response = source.response
                    answer = follow.answered(response.status_code, response.headers.get("content-type", ""))
                    if answer == "stream":
                        for sse in source.iter_sse():
                            event = follow.received(sse.event, sse.data, sse.id)
                            if event is not None:
                                yield event
                            if follow.finished:
                                return
                    else:
                        response.read()
                        refusal = response_error(response)
            except (httpx.TransportError, SSEError):
                pass
            wait = POLL if answer == POLL else follow.next(refusal)
            if wait == POLL:
                yield from self._poll(follow)
                return
            time.sleep(wait)

    def _poll(self, follow: EventFollower) -> Iterator[JobEvent]:
        while True:
            yield from follow.polled(self.get(follow.job_id, results_limit=1))
            if follow.finished:
                return
            time.sleep(follow.poll_wait())

    def wait(
        self, job_id: str, *, on_event: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> Job:
        """Follow the job until it succeeds, fails or is canceled, and return it (its first page
        of results). `on_event` sees every event on the way. Raises WaitTimeout after `timeout`
        seconds, whether or not events arrive meanwhile."""
        for event in self.events(job_id, timeout=timeout):
            if on_event:
                on_event(event)
        return self.get(job_id)

    # -- downloading

    def manifest(self, job: Job) -> dict[str, Any] | None:
        """The job's manifest.json (per image: index, seed, key, sha256, size), or None when the
        server publishes none."""
        if not job.manifest_url:
            return None
        return self._send(api.storage(job.manifest_url), self._storage).json()

    def download(
        self,
        job_id: str,
        directory: str | Path,
        *,
        concurrency: int = 8,
        on_image: Callable[[Path], None] | None = None,
    ) -> Download:
        """Write every image of a succeeded job to directory/NNNNN.png and its manifest.json,
        each checked against the manifest; files already there and matching are not fetched.
        `on_image` sees each image's path once it is in place."""
        job = self.get(job_id, results_limit=1)
        require_succeeded(job)
        plan = DownloadPlan(directory, self.manifest(job))

        def fetch(result: ImageResult) -> Path:
            if plan.needed(result):
                plan.store(result, self._send(api.storage(result.url), self._storage).content)
            path = plan.path(result)
            if on_image:
                on_image(path)
            return path

        results = self.results(job_id)
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            paths = list(pool.map(fetch, results))
        return plan.finish(paths, results)
