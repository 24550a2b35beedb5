"""/v1/jobs: submit, poll, follow (server-sent events), cancel, list and download generation
jobs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.concurrency import iterate_in_threadpool
from starlette.types import Message, Send

from service import archive
from service.api.deps import UNAUTHORIZED, Context, Ctx, Owner, Reader
from service.api.quotas import too_many
from service.api.schemas import ImageResult, JobCreate, JobList, JobSummary, JobView, Progress, QueuePosition
from service.api.webhooks import webhook_target
from service.jobs import capacity, keys
from service.jobs.events import MAX_PREVIEWS, EventKind, JobEvent, default_preview_every, is_event_id
from service.jobs.schemas import JobParams, JobStatus
from service.jobs.slots import Lease
from service.jobs.store import (
    CostInFlightExceeded,
    Cursor,
    IdempotencyConflict,
    JobFinished,
    JobNotFound,
    JobRecord,
    TooManyJobsInFlight,
    TooManyJobsStored,
)
from service.logs import job_fields
from service.storage import image_key, manifest_key
from undiffuse.config import ModelSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED)
NOT_FOUND = "job not found"
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as submit_job makes them
CURSOR = re.compile(r"(?P<score>[0-9]{1,20})\.(?P<job_id>[0-9a-f]{32})")
ERRORS = {404: {"description": "no such job for this API key"}}
MAX_RESULTS_PAGE = 1024
KEEPALIVE_S = 15  # an SSE comment line this often keeps proxies from closing an idle stream
RECHECK_S = 10  # an idle event stream re-reads the record this often (a job gone or from before events)
log = logging.getLogger("ray.serve")


def _known_format(job_id: str) -> str:
    """A job id of the form the service issues; anything else is 404 before Redis is asked (an
    id like '<job>:done' would otherwise name another key, and reveal that it exists)."""
    if not JOB_ID.fullmatch(job_id):
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND)
    return job_id


def _invalid(field: str, message: str, value: Any) -> RequestValidationError:
    """A 422 shaped like FastAPI's own: detail[0].loc names the field."""
    return RequestValidationError([{"type": "value_error", "loc": ("body", field), "msg": message, "input": value}])


def resolve_params(body: JobCreate, ctx: Context) -> JobParams:
    """Check what depends on the model and the server's limits; fill the defaults."""
    model = ctx.registry.get(body.model)
    if model is None:
        raise _invalid(
            "model", f"unknown model {body.model!r}; available: {', '.join(ctx.registry.models)}", body.model
        )
    limit = ctx.settings.max_images_per_job
    if body.num_images > limit:
        raise _invalid("num_images", f"must be at most {limit}", body.num_images)
    max_steps = min(model.schedule.num_timesteps, ctx.settings.max_steps)
    if body.steps > max_steps:
        raise _invalid("steps", f"must be at most {max_steps} for model {model.name!r}", body.steps)
    _check_labels(body, model)
    cost = body.num_images * body.steps * (2 if body.guidance_scale != 1.0 else 1)  # JobParams.cost
    if cost > ctx.settings.max_job_cost:
        raise _invalid(
            "num_images",
            f"the job costs {cost:,} image-steps (num_images x steps, x2 with guidance); "
            f"the limit is {ctx.settings.max_job_cost:,}: use fewer images or steps, or split the job",
            body.num_images,
        )
    if body.preview_every is not None and not body.previews:
        raise _invalid("preview_every", "needs previews: true", body.preview_every)
    fewest = -(-body.steps // MAX_PREVIEWS)
    if body.previews and body.preview_every is not None and body.preview_every < fewest:
        raise _invalid(
            "preview_every",
            f"must be at least {fewest} for {body.steps} steps (at most {MAX_PREVIEWS} previews)",
            body.preview_every,
        )
    return JobParams(
        model=model.name,
        num_images=body.num_images,
        steps=body.steps,
        sampler=body.sampler,
        eta=body.eta,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**32),
        class_label=body.class_label,
        guidance_scale=body.guidance_scale,
        previews=body.previews,
        preview_every=(body.preview_every or default_preview_every(body.steps)) if body.previews else None,
    )


def _hashed_body(body: JobCreate) -> dict:
    """What an Idempotency-Key is compared on: the body with its defaults filled in, less the
    preview and webhook fields when unused (so keys used before they existed still match)."""
    dump = body.model_dump()
    if not body.previews and body.preview_every is None:
        del dump["previews"], dump["preview_every"]
    if body.webhook_url is None and body.webhook_events is None:
        del dump["webhook_url"], dump["webhook_events"]
    return dump


def _check_labels(body: JobCreate, model: ModelSpec) -> None:
    labels = body.class_label
    if model.num_classes is None:
        if labels is not None:
            raise _invalid("class_label", f"model {model.name!r} is unconditional; omit class_label", labels)
        if body.guidance_scale != 1.0:
            raise _invalid(
                "guidance_scale", f"model {model.name!r} is unconditional; guidance needs classes", body.guidance_scale
            )
        return
    k = model.num_classes
    if labels is None:
        raise _invalid("class_label", f"required: model {model.name!r} is class-conditional (0..{k - 1})", None)
    if isinstance(labels, list) and len(labels) != body.num_images:
        raise _invalid("class_label", f"has {len(labels)} labels for {body.num_images} images", labels)
    for value in labels if isinstance(labels, list) else [labels]:
        if not 0 <= value < k:
            raise _invalid("class_label", f"{value} is out of range 0..{k - 1}", labels)


def job_view(record: JobRecord, ctx: Context, offset: int = 0, limit: int = MAX_RESULTS_PAGE) -> JobView:
    """The job as the API shows it, with results [offset, offset + limit) of its finished images
    (presigned here: call it off the event loop)."""
    indices: list[int] = []
    if record.status not in (JobStatus.failed, JobStatus.canceled):  # their images are being deleted
        for shard in sorted(record.done_shards):
            start, count = record.shard_range(shard)  # as the job was cut, whatever the setting is now
            indices.extend(range(start, start + count))
    page = indices[offset : offset + limit]
    results = [
        ImageResult(
            index=i,
            seed=record.params.seed,
            key=image_key(record.id, i),
            url=ctx.objects.presign(image_key(record.id, i)),
        )
        for i in page
    ]
    return JobView(
        id=record.id,
        status=record.status,
        progress=_progress(record),
        params=record.params,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        error=record.error,
        results=results,
        results_next_offset=offset + limit if offset + limit < len(indices) else None,
        manifest_url=ctx.objects.presign(manifest_key(record.id)) if record.status == JobStatus.succeeded else None,
        webhooks=record.webhooks,
    )


def queued_view(job_id: str, params: JobParams, created_at: float) -> JobView:
    """The job as it was when it was queued: what submit answers and the `queued` event says."""
    return JobView(
        id=job_id,
        status=JobStatus.queued,
        progress=Progress(images_done=0, images_total=params.num_images, step=0, steps=params.steps),
        params=params,
        created_at=created_at,
    )


async def _view(record: JobRecord, ctx: Context, offset: int = 0, limit: int = MAX_RESULTS_PAGE) -> JobView:
    """job_view off the event loop: presigning a large job's URLs must not stall other requests."""
    return await asyncio.to_thread(job_view, record, ctx, offset, limit)


def _progress(record: JobRecord) -> Progress:
    return Progress(
        images_done=record.images_done,
        images_total=record.params.num_images,
        step=record.step,
        steps=record.params.steps,
    )


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=JobView,
    responses={
        200: {"description": "a replay: the job this Idempotency-Key made", "model": JobView},
        400: {"description": "the body is not JSON (e.g. not UTF-8)"},
        413: {"description": "the body is larger than max_body_bytes"},
        409: {"description": "the Idempotency-Key was used with another body"},
        429: {"description": "a per-key quota is spent; retry after Retry-After seconds"},
        503: {"description": "Redis is unreachable; nothing was queued, retry after Retry-After seconds"},
    },
)
async def submit_job(
    body: JobCreate,
    ctx: Ctx,
    owner: Owner,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobView:
    """Validate and durably queue a job. The same Idempotency-Key and body return the same job.

    Per API key: at most max_submissions_per_minute_per_key submissions a minute and
    max_jobs_in_flight_per_key jobs queued or running; beyond either, 429 with Retry-After."""
    params = resolve_params(body, ctx)
    if ctx.quota is not None:  # before any DNS lookup, so slow lookups are rate-limited too
        await ctx.quota.spend(owner)
    try:
        replay = idempotency_key and await ctx.store.replayed(owner, idempotency_key, _hashed_body(body))
    except IdempotencyConflict:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different body"
        ) from None
    if not replay:  # a retry of a job already made is answered whatever the quotas say now
        await _check_daily_cost_and_storage(ctx, owner, params)
    webhook = await webhook_target(body, ctx, owner)  # 422 for a URL that may not be delivered to
    limit = ctx.settings.max_jobs_in_flight_per_key
    try:
        job_id, created, created_at = await ctx.store.submit(
            owner,
            params,
            _hashed_body(body),
            idempotency_key,
            max_in_flight=limit,
            webhook=webhook,
            max_cost_in_flight=ctx.settings.max_cost_in_flight_per_key,
            max_stored=ctx.settings.max_jobs_stored_per_key,
        )
    except IdempotencyConflict:
        raise HTTPException(
            status.HTTP_409_CONFLICT, "Idempotency-Key was already used with a different body"
        ) from None
    except TooManyJobsInFlight:
        raise too_many(f"quota: at most {limit} jobs queued or running per API key; retry when one ends", 5) from None
    except TooManyJobsStored as e:
        raise too_many(
            f"quota: at most {e.limit:,} jobs stored per API key; delete finished jobs (DELETE /v1/jobs/{{id}}) or "
            "wait for them to expire",
            60,
        ) from None
    except CostInFlightExceeded as e:
        raise too_many(
            f"quota: at most {e.limit:,} image-steps queued or running per API key; {e.in_flight:,} are, and this "
            f"job costs {params.cost:,}: retry when one ends",
            5,
        ) from None
    if created and ctx.daily_cost is not None:
        await ctx.daily_cost.spend(owner, params.cost)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    if not created:  # an earlier request made it: report its current state
        response.status_code = status.HTTP_200_OK
        try:
            return await _view(await ctx.store.get_owned(job_id, owner), ctx)
        except JobNotFound:  # the key outlived its job's record (both expire; the record first)
            raise HTTPException(
                status.HTTP_409_CONFLICT, "Idempotency-Key belongs to a job that no longer exists; use a new key"
            ) from None
    log.info(
        "job %s queued: %d images, %s, %d steps", job_id, params.num_images, params.sampler, params.steps,
        extra=job_fields(job_id, owner, status="queued", images=params.num_images, steps=params.steps,
                         sampler=params.sampler, model=params.model),
    )  # fmt: skip
    return queued_view(job_id, params, created_at)


@router.get("/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(
    job_id: str,
    ctx: Ctx,
    owner: Reader,
    results_offset: Annotated[int, Query(ge=0, le=2**31, description="first result to return")] = 0,
    results_limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_PAGE, description="results per page")] = MAX_RESULTS_PAGE,
) -> JobView:
    """The job's status, progress and finished images (presigned URLs), results paginated."""
    try:
        record = await ctx.store.get_owned(_known_format(job_id), owner)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
    view = await _view(record, ctx, results_offset, results_limit)
    if record.status == JobStatus.queued:
        view.queue = await queue_position(ctx, record)
    return view


async def _check_daily_cost_and_storage(ctx: Context, owner: str, params: JobParams) -> None:
    """429 when the job would pass the owner's image-steps for the day, or the owner's images in
    the bucket are at their limit."""
    if ctx.daily_cost is not None:
        await ctx.daily_cost.check(owner, params.cost)
    stored, storage_limit = await ctx.store.stored_bytes(owner), ctx.settings.max_stored_bytes_per_key
    if stored >= storage_limit:
        raise too_many(
            f"quota: {stored:,} bytes of images stored for this API key; the limit is {storage_limit:,}: delete "
            "finished jobs (DELETE /v1/jobs/{id}) or wait for them to expire",
            60,
        )


async def queue_position(ctx: Context, record: JobRecord) -> QueuePosition:
    """Where a queued job stands (service.jobs.queue.ShardQueue.position), its start estimated
    from the Denoisers' reported throughput (service.jobs.capacity)."""
    now = time.time()
    rate = (await capacity.read(ctx.store.r)).throughput
    ahead, start_at = await ctx.store.queue.position(keys.job(record.id), record.owner, now, rate)
    return QueuePosition(
        ahead_row_steps=ahead,
        estimated_start_seconds=None if start_at is None else round(max(0.0, start_at - now), 3),
        estimated_start_at=start_at,
    )


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        **ERRORS,
        200: {"description": "the job's server-sent events (README)", "content": {"text/event-stream": {}}},
        400: {"description": "Last-Event-ID is not an event id this API issued"},
        429: {"description": "this key has max_event_streams_per_key streams and downloads open; retry later"},
    },
)
async def job_events(
    job_id: str,
    ctx: Ctx,
    owner: Reader,
    last_event_id: Annotated[str | None, Header(max_length=64, description="resume after this event")] = None,
) -> EventSourceResponse:
    """The job's events as server-sent events: `queued` (the job view), `started`, `progress`,
    `preview` (when asked for at submit), then exactly one of `succeeded`, `failed` or
    `canceled` (the job view), after which the stream ends. Each event's id resumes the stream
    after it through the Last-Event-ID header; a finished job's events are replayed."""
    try:
        record = await ctx.store.get_owned(_known_format(job_id), owner)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
    if last_event_id is not None and not is_event_id(last_event_id):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Last-Event-ID is not an event id of this stream")
    lease = await _reserve(ctx, owner)
    return LeasedEventSourceResponse(
        lease,
        _event_stream(ctx, record, last_event_id or "0", lease),
        ping=KEEPALIVE_S,
        send_timeout=ctx.settings.stream_send_timeout_seconds,
        headers={"Cache-Control": "no-store"},
    )


class LeasedEventSourceResponse(EventSourceResponse):
    """An event stream that gives its owner's slot back when it ends, however it ends (also when
    the client was gone before its first event)."""

    def __init__(self, lease: Lease, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.lease.release()


async def _reserve(ctx: Context, owner: str) -> Lease:
    """One of the owner's slots for a long response, taken before the response starts (each
    one holds a request slot of an Ingress replica while it flows), or 429."""
    lease = await ctx.slots.acquire(owner)
    if lease is None:
        limit = ctx.settings.max_event_streams_per_key
        raise too_many(
            f"at most {limit} open event streams and archive downloads per API key; close one, or poll "
            "GET /v1/jobs/{id}",
            5,
        )
    return lease


async def _event_stream(ctx: Context, record: JobRecord, after: str, lease: Lease) -> AsyncIterator[ServerSentEvent]:
    """The job's stored events after `after`, then live ones, until its terminal event, or for
    at most event_stream_max_seconds, holding the owner's slot `lease` (released at the end). Reads block for half the Redis socket timeout at a time (a
    longer block would be a read timeout); sse-starlette writes the keep-alive comments
    meanwhile. A Redis error or the time limit ends the stream: the client resumes with
    Last-Event-ID."""
    block_ms = max(1, int(ctx.settings.redis_timeout_seconds * 500))
    recheck = 0.0  # at once when the stream is first idle
    ends = time.monotonic() + ctx.settings.event_stream_max_seconds
    try:
        while time.monotonic() < ends and await lease.keep():
            events = await ctx.store.read_events(record.id, after, block_ms=block_ms)
            if not events and time.monotonic() >= recheck:
                recheck = time.monotonic() + RECHECK_S
                now = await ctx.store.get(record.id)
                if now is None:  # deleted or expired: nothing more will come
                    return
                if now.status.terminal:  # its terminal event was appended with the status, or never (older jobs)
                    events = await ctx.store.read_events(record.id, after) or [JobEvent("", EventKind(now.status), "")]
            for event in events:
                yield await _render(ctx, record, event)
                after = event.id or after
                if event.kind.terminal:
                    return
    except RedisError as e:
        log.warning("job %s: event stream ended by a Redis error: %s", record.id, type(e).__name__)
    finally:
        await lease.release()


async def _render(ctx: Context, record: JobRecord, event: JobEvent) -> ServerSentEvent:
    """An event as sent: queued and terminal events carry the job view (the terminal one as the
    job is now, with fresh result URLs), the others their stored data."""
    if event.kind == EventKind.queued:
        data = queued_view(record.id, record.params, record.created_at).model_dump_json()
    elif event.kind.terminal:
        now = await ctx.store.get(record.id) or dataclasses.replace(record, status=JobStatus(event.kind.value))
        data = (await _view(now, ctx)).model_dump_json()
    else:
        data = event.data
    return ServerSentEvent(data=data, event=event.kind.value, id=event.id or None)


@router.get(
    "/{job_id}/archive",
    response_class=StreamingResponse,
    responses={
        **ERRORS,
        200: {"description": "a ZIP of the job's images and manifest.json", "content": {"application/zip": {}}},
        409: {"description": "the job has not succeeded"},
        429: {"description": "this key has max_event_streams_per_key streams and downloads open; retry later"},
        503: {"description": "object storage is unreachable; retry"},
    },
)
async def job_archive(job_id: str, ctx: Ctx, owner: Reader) -> StreamingResponse:
    """A succeeded job's images (00000.png, 00001.png, ... by result index) and its
    manifest.json in one ZIP, streamed from the bucket as it is sent."""
    try:
        record = await ctx.store.get_owned(_known_format(job_id), owner)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
    if record.status != JobStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job is {record.status.value}; only a succeeded job has an archive"
        )
    lease = await _reserve(ctx, owner)  # before any S3 work: a refused download costs none
    try:
        files = await ctx.store.files(record)
        manifest = await asyncio.to_thread(archive.load_manifest, ctx.objects, record, files)  # S3 away: 503
        stream = archive.zip_archive(ctx.objects, manifest)
    except BaseException:
        await lease.release()
        raise
    return TimedStreamingResponse(
        _leased(iterate_in_threadpool(iter(stream)), lease),  # each S3 read in a thread
        lease=lease,
        send_timeout=ctx.settings.stream_send_timeout_seconds,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{record.id}.zip"', "Content-Length": str(len(stream))},
    )


async def _leased(chunks: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    """chunks, while the lease holds; the slot is given back when they end or the client goes."""
    try:
        async for chunk in chunks:
            if not await lease.keep():
                return  # lapsed: the slot may be another response's now (the client sees a short body)
            yield chunk
    finally:
        await lease.release()


class TimedStreamingResponse(StreamingResponse):
    """A StreamingResponse whose every send must finish within send_timeout seconds: a client
    that stops reading gives its request slot back instead of holding it. The lease is released
    when the response ends however it ends (also when its body never started)."""

    def __init__(self, content: AsyncGenerator[bytes, None], lease: Lease, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.lease = lease
        self.send_timeout = send_timeout

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.lease.release()

    async def stream_response(self, send: Send) -> None:
        async def timed(message: Message) -> None:
            with anyio.fail_after(self.send_timeout):
                await send(message)

        try:
            await super().stream_response(timed)
        finally:  # closed now, not when collected: its cleanup gives the owner's slot back
            await self.body_iterator.aclose()


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        **ERRORS,
        409: {"description": "the job is still queued or running: cancel it first"},
        503: {"description": "object storage or Redis is unreachable; retry (the job stays listed until it is gone)"},
    },
)
async def delete_job(job_id: str, ctx: Ctx, owner: Owner) -> Response:
    """Delete a finished job: its images first, then its record. Repeating it answers 404."""
    try:
        record = await ctx.store.get_owned(_known_format(job_id), owner)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
    if not record.status.terminal:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {record.status.value}; cancel it before deleting it")
    await asyncio.to_thread(ctx.objects.delete_job, job_id)
    await ctx.store.release_storage(job_id)
    await ctx.store.delete(job_id, owner)
    # a shard retried by a slow duplicate could still upload: sweep the prefix once more later
    await ctx.store.schedule_purge(job_id, time.time() + ctx.settings.purge_delay_seconds)
    log.info("job %s deleted", job_id, extra=job_fields(job_id, owner, status="deleted"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses={**ERRORS, 409: {"description": "the job already finished"}},
)
async def cancel_job(job_id: str, ctx: Ctx, owner: Owner) -> JobView:
    """A queued job never runs; a running one stops at its next denoising step."""
    try:
        record = await ctx.lifecycle.cancel(_known_format(job_id), owner)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, NOT_FOUND) from None
    except JobFinished as e:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job already {e.status.value}; nothing to cancel") from None
    log.info("job %s canceled", job_id, extra=job_fields(job_id, owner, status="canceled"))
    return await _view(record, ctx)


@router.get("", response_model=JobList)
async def list_jobs(
    ctx: Ctx,
    owner: Reader,
    status_: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=64, description="next_cursor of the previous page")] = None,
) -> JobList:
    """The caller's jobs, newest first, optionally only those of one status."""
    records, next_cursor = await ctx.store.list_owned(owner, status_, limit, _parse_cursor(cursor))
    jobs = [
        JobSummary(id=r.id, status=r.status, progress=_progress(r), created_at=r.created_at, finished_at=r.finished_at)
        for r in records
    ]
    return JobList(jobs=jobs, next_cursor=f"{next_cursor[0]}.{next_cursor[1]}" if next_cursor else None)


def _parse_cursor(cursor: str | None) -> Cursor | None:
    """A next_cursor this API issued, or 422. (It is a position only: another key's cursor just
    positions the caller in its own list.)"""
    if cursor is None:
        return None
    match = CURSOR.fullmatch(cursor)
    if match is None:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("query", "cursor"),
                    "msg": "not a cursor this API issued",
                    "input": cursor,
                }
            ]
        )
    return int(match["score"]), match["job_id"]
