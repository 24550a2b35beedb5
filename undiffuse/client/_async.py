"""`AsyncClient`: the API over httpx's asyncio client, method for method what `Client` does
(the same requests, retry decisions, events state machine and download plan), awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

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


class AsyncClient:
    """The undiffuse API for asyncio code: every method of `Client`, awaited (`events` is an
    async iterator). Use as an async context manager, or await close()."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 3,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url, headers = endpoint(url, api_key)
        self._policy = policy(retries)
        self._http = httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout, transport=transport)
        self._storage = httpx.AsyncClient(timeout=timeout, transport=transport)  # no API key

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()
        await self._storage.aclose()

    async def _send(self, request: ApiRequest, http: httpx.AsyncClient | None = None) -> httpx.Response:
        acted = False  # an earlier send may have been carried out
        async for attempt in self._policy.retrying(request.idempotent):
            with attempt:
                try:
                    response = await (http or self._http).request(
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

    async def _call(self, request: ApiRequest) -> Any:
        response = await self._send(request)
        return request.parse(response.json() if request.has_body else None)

    # -- jobs

    async def submit(self, num_images: int = 1, *, idempotency_key: str | None = None, **params: Any) -> Job:
        """POST /v1/jobs (see `Client.submit`)."""
        return await self._call(api.submit(num_images, idempotency_key, params))

    async def get(self, job_id: str, *, results_offset: int = 0, results_limit: int = RESULTS_PAGE) -> Job:
        return await self._call(api.get(job_id, results_offset, results_limit))

    async def results(self, job_id: str) -> list[ImageResult]:
        """Every result of the job, through every page."""
        results: list[ImageResult] = []
        offset: int | None = 0
        while offset is not None:
            job = await self.get(job_id, results_offset=offset)
            results.extend(job.results)
            offset = job.results_next_offset
        return results

    async def list(self, *, status: str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        return await self._call(api.list_jobs(status, limit, cursor))

    async def cancel(self, job_id: str) -> Job:
        return await self._call(api.cancel(job_id))

    async def delete(self, job_id: str) -> None:
        await self._call(api.delete(job_id))

    async def models(self) -> list[dict[str, Any]]:
        return await self._call(api.models())

    async def webhook_secret(self) -> str:
        """The secret that signs this owner's webhook deliveries (GET /v1/webhook-secret)."""
        return await self._call(api.webhook_secret())

    async def archive(self, job_id: str, path: str | Path) -> int:
        """A succeeded job's ZIP streamed to `path` (see `Client.archive`); returns its size."""
        request, file = api.archive(job_id), ArchiveFile(path, job_id)
        async for attempt in self._policy.retrying(request.idempotent):
            with attempt:
                async with self._http.stream(request.method, request.path) as response:
                    if not response.is_success:
                        await response.aread()
                        _raise_for(response)
                    with file.open() as out:
                        async for chunk in response.aiter_bytes():
                            out.write(chunk)
                            file.wrote(chunk)
        return file.finish(response.headers.get("content-length"))

    # -- watching

    async def events(
        self, job_id: str, last_event_id: str | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[JobEvent]:
        """The job's events until its terminal one (see `Client.events`)."""
        follow = EventFollower(job_id, last_event_id, timeout, policy=self._policy)
        while True:
            answer, refusal = "dropped", None
            try:
                request = follow.request()
                connect, read = follow.timeouts()
                limits = httpx.Timeout(connect, read=read)
                async with aconnect_sse(
                    self._http, request.method, request.path, headers=request.headers, timeout=limits
                ) as source:
                    response = source.response
                    answer = follow.answered(response.status_code, response.headers.get("content-type", ""))
                    if answer == "stream":
                        async for sse in source.aiter_sse():
                            event = follow.received(sse.event, sse.data, sse.id)
                            if event is not None:
                                yield event
                            if follow.finished:
                                return
                    else:
                        await response.aread()
                        refusal = response_error(response)
            except (httpx.TransportError, SSEError):
                pass
            wait = POLL if answer == POLL else follow.next(refusal)
            if wait == POLL:
                async for event in self._poll(follow):
                    yield event
                return
            await asyncio.sleep(wait)

    async def _poll(self, follow: EventFollower) -> AsyncIterator[JobEvent]:
        while True:
            for event in follow.polled(await self.get(follow.job_id, results_limit=1)):
                yield event
            if follow.finished:
                return
            await asyncio.sleep(follow.poll_wait())

    async def wait(
        self, job_id: str, *, on_event: Callable[[JobEvent], None] | None = None, timeout: float | None = None
    ) -> Job:
        """Follow the job until it ends and return it (see `Client.wait`)."""
        async for event in self.events(job_id, timeout=timeout):
            if on_event:
                on_event(event)
        return await self.get(job_id)

    # -- downloading

    async def manifest(self, job: Job) -> dict[str, Any] | None:
        """The job's manifest.json, or None when the server publishes none."""
        if not job.manifest_url:
            return None
        return (await self._send(api.storage(job.manifest_url), self._storage)).json()

    async def download(
        self,
        job_id: str,
        directory: str | Path,
        *,
        concurrency: int = 8,
        on_image: Callable[[Path], None] | None = None,
    ) -> Download:
        """Every image of a succeeded job to directory/NNNNN.png, checked (see `Client.download`).
        Hashing and writing files run in threads, off the event loop."""
        job = await self.get(job_id, results_limit=1)
        require_succeeded(job)
        plan = DownloadPlan(directory, await self.manifest(job))
        gate = asyncio.Semaphore(max(1, concurrency))

        async def fetch(result: ImageResult) -> Path:
            if await asyncio.to_thread(plan.needed, result):
                async with gate:
                    response = await self._send(api.storage(result.url), self._storage)
                await asyncio.to_thread(plan.store, result, response.content)
            path = plan.path(result)
            if on_image:
                on_image(path)
            return path

        results = await self.results(job_id)
        paths = list(await asyncio.gather(*(fetch(r) for r in results)))
        return plan.finish(paths, results)
