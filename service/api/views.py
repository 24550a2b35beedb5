"""Jobs as the API shows them: the job view (with presigned result URLs), a queued job's place,
and its progress."""

from __future__ import annotations

import asyncio
import time

from service.api.deps import Context
from service.api.schemas import ImageResult, JobView, Progress, QueuePosition
from service.jobs import capacity, redis_keys
from service.jobs.records import JobParams, JobStatus
from service.jobs.store import JobRecord
from service.storage import image_key, manifest_key

MAX_RESULTS_PAGE = 1024


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
            key=image_key(record.id, i, record.params.image_suffix),
            url=ctx.objects.presign(image_key(record.id, i, record.params.image_suffix)),
        )
        for i in page
    ]
    return JobView(
        id=record.id,
        status=record.status,
        progress=progress(record),
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


async def view(record: JobRecord, ctx: Context, offset: int = 0, limit: int = MAX_RESULTS_PAGE) -> JobView:
    """job_view off the event loop: presigning a large job's URLs must not stall other requests."""
    return await asyncio.to_thread(job_view, record, ctx, offset, limit)


def progress(record: JobRecord) -> Progress:
    return Progress(
        images_done=record.images_done,
        images_total=record.params.num_images,
        step=record.step,
        steps=record.params.steps,
    )


async def queue_position(ctx: Context, record: JobRecord) -> QueuePosition:
    """Where a queued job stands (service.jobs.queue.ShardQueue.position), its start estimated
    from the Denoisers' reported throughput (service.jobs.capacity)."""
    now = time.time()
    rate = (await capacity.read(ctx.store.r)).throughput
    ahead, start_at = await ctx.store.queue.position(redis_keys.job(record.id), record.owner, now, rate)
    return QueuePosition(
        ahead_row_steps=ahead,
        estimated_start_seconds=None if start_at is None else round(max(0.0, start_at - now), 3),
        estimated_start_at=start_at,
    )
