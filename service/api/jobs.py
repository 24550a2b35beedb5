"""/v1/jobs: submit, poll, follow (server-sent events), cancel, list and download generation
jobs. Routes only: parameters are checked in service.api.params, jobs are shown by
service.api.views, long responses live in service.api.streams, and what the job store raises
(not found, finished, a reused key) is answered app-wide (service.api.errors)."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.responses import StreamingResponse
from sse_starlette import EventSourceResponse
from starlette.concurrency import iterate_in_threadpool

from service import archive
from service.api.deps import UNAUTHORIZED, Context, Ctx, ManagedJob, OwnedJob, Owner, Reader, known_format
from service.api.errors import invalid
from service.api.params import hashed_body, resolve_params
from service.api.quotas import too_many
from service.api.schemas import JobCreate, JobList, JobSummary, JobView
from service.api.streams import (
    KEEPALIVE_S,
    LeasedEventSourceResponse,
    TimedStreamingResponse,
    event_stream,
    leased,
    reserve,
)
from service.api.views import MAX_RESULTS_PAGE, progress, queue_position, queued_view, view
from service.api.webhook_routes import webhook_target
from service.jobs.events import is_event_id
from service.jobs.records import JobParams, JobStatus
from service.jobs.store import (
    CostInFlightExceeded,
    Cursor,
    JobNotFound,
    TooManyJobsInFlight,
    TooManyJobsStored,
)
from service.logs import job_fields

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED)
CURSOR = re.compile(r"(?P<score>[0-9]{1,20})\.(?P<job_id>[0-9a-f]{32})")
ERRORS = {404: {"description": "no such job for this API key"}}
log = logging.getLogger("ray.serve")


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
    replay = idempotency_key and await ctx.store.replayed(owner, idempotency_key, hashed_body(body))
    if not replay:  # a retry of a job already made is answered whatever the quotas say now
        await _check_daily_cost_and_storage(ctx, owner, params)
    webhook = await webhook_target(body, ctx, owner)  # 422 for a URL that may not be delivered to
    try:
        job_id, created, created_at = await ctx.store.submit(
            owner,
            params,
            hashed_body(body),
            idempotency_key,
            max_in_flight=ctx.settings.max_jobs_in_flight_per_key,
            webhook=webhook,
            max_cost_in_flight=ctx.settings.max_cost_in_flight_per_key,
            max_stored=ctx.settings.max_jobs_stored_per_key,
        )
    except (TooManyJobsInFlight, TooManyJobsStored, CostInFlightExceeded) as e:
        raise _over_quota(e, params) from None
    if created and ctx.daily_cost is not None:
        await ctx.daily_cost.spend(owner, params.cost)
    response.headers["Location"] = f"/v1/jobs/{job_id}"
    if not created:  # an earlier request made it: report its current state
        response.status_code = status.HTTP_200_OK
        try:
            return await view(await ctx.store.get_owned(job_id, owner), ctx)
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


def _over_quota(e: Exception, params: JobParams) -> HTTPException:
    """429 for a submission the job store refused for its owner's jobs or cost in flight."""
    if isinstance(e, TooManyJobsInFlight):
        return too_many(f"quota: at most {e.limit} jobs queued or running per API key; retry when one ends", 5)
    if isinstance(e, TooManyJobsStored):
        return too_many(
            f"quota: at most {e.limit:,} jobs stored per API key; delete finished jobs (DELETE /v1/jobs/{{id}}) or "
            "wait for them to expire",
            60,
        )
    assert isinstance(e, CostInFlightExceeded)
    return too_many(
        f"quota: at most {e.limit:,} image-steps queued or running per API key; {e.in_flight:,} are, and this "
        f"job costs {params.cost:,}: retry when one ends",
        5,
    )


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


@router.get("/{job_id}", response_model=JobView, responses=ERRORS)
async def get_job(
    record: OwnedJob,
    ctx: Ctx,
    results_offset: Annotated[int, Query(ge=0, le=2**31, description="first result to return")] = 0,
    results_limit: Annotated[int, Query(ge=1, le=MAX_RESULTS_PAGE, description="results per page")] = MAX_RESULTS_PAGE,
) -> JobView:
    """The job's status, progress and finished images (presigned URLs), results paginated."""
    shown = await view(record, ctx, results_offset, results_limit)
    if record.status == JobStatus.queued:
        shown.queue = await queue_position(ctx, record)
    return shown


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
    record: OwnedJob,
    ctx: Ctx,
    last_event_id: Annotated[str | None, Header(max_length=64, description="resume after this event")] = None,
) -> LeasedEventSourceResponse:
    """The job's events as server-sent events: `queued` (the job view), `started`, `progress`,
    `preview` (when asked for at submit), then exactly one of `succeeded`, `failed` or
    `canceled` (the job view), after which the stream ends. Each event's id resumes the stream
    after it through the Last-Event-ID header; a finished job's events are replayed."""
    if last_event_id is not None and not is_event_id(last_event_id):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "Last-Event-ID is not an event id of this stream")
    lease = await reserve(ctx, record.owner)
    return LeasedEventSourceResponse(
        lease,
        event_stream(ctx, record, last_event_id or "0", lease),
        ping=KEEPALIVE_S,
        send_timeout=ctx.settings.stream_send_timeout_seconds,
        headers={"Cache-Control": "no-store"},
    )


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
async def job_archive(record: OwnedJob, ctx: Ctx) -> TimedStreamingResponse:
    """A succeeded job's images (00000.png, 00001.png, ... by result index) and its
    manifest.json in one ZIP, streamed from the bucket as it is sent."""
    if record.status != JobStatus.succeeded:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"job is {record.status.value}; only a succeeded job has an archive"
        )
    lease = await reserve(ctx, record.owner)  # before any S3 work: a refused download costs none
    try:
        manifest = await asyncio.to_thread(archive.load_manifest, ctx.objects, record)  # S3 away: 503
        stream = archive.zip_archive(ctx.objects, manifest)
    except BaseException as e:
        await lease.release()
        if isinstance(e, archive.ManifestMissing):
            raise HTTPException(status.HTTP_404_NOT_FOUND, "the job's images are no longer in the bucket") from e
        raise
    return TimedStreamingResponse(
        leased(iterate_in_threadpool(iter(stream)), lease),  # each S3 read in a thread
        lease=lease,
        send_timeout=ctx.settings.stream_send_timeout_seconds,
        media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{record.id}.zip"', "Content-Length": str(len(stream))},
    )


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={
        **ERRORS,
        409: {"description": "the job is still queued or running: cancel it first"},
        503: {"description": "object storage or Redis is unreachable; retry (the job stays listed until it is gone)"},
    },
)
async def delete_job(record: ManagedJob, ctx: Ctx) -> Response:
    """Delete a finished job: its images first, then its record. Repeating it answers 404."""
    if not record.status.terminal:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {record.status.value}; cancel it before deleting it")
    await asyncio.to_thread(ctx.objects.delete_job, record.id)
    await ctx.store.release_storage(record.id)
    await ctx.store.delete(record.id, record.owner)
    # a shard retried by a slow duplicate could still upload: sweep the prefix once more later
    await ctx.store.purges.schedule(record.id, time.time() + ctx.settings.purge_delay_seconds)
    log.info("job %s deleted", record.id, extra=job_fields(record.id, record.owner, status="deleted"))
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post(
    "/{job_id}/cancel",
    response_model=JobView,
    responses={**ERRORS, 409: {"description": "the job already finished"}},
)
async def cancel_job(job_id: str, ctx: Ctx, owner: Owner) -> JobView:
    """A queued job never runs; a running one stops at its next denoising step."""
    record = await ctx.lifecycle.cancel(known_format(job_id), owner)  # 404, or 409 when already finished
    log.info("job %s canceled", job_id, extra=job_fields(job_id, owner, status="canceled"))
    return await view(record, ctx)


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
        JobSummary(id=r.id, status=r.status, progress=progress(r), created_at=r.created_at, finished_at=r.finished_at)
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
        raise invalid("cursor", "not a cursor this API issued", cursor, location="query")
    return int(match["score"]), match["job_id"]
