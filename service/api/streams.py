"""Long responses: a job's server-sent events and its ZIP download, each holding one of its
owner's slots (service.jobs.slots) from before it starts until it ends, however it ends, and
ended when its client stops reading."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.types import Message, Send

from service.api.deps import Context
from service.api.quotas import too_many
from service.api.views import queued_view, view
from service.jobs.events import EventKind, JobEvent
from service.jobs.records import JobStatus
from service.jobs.slots import Lease
from service.jobs.store import JobRecord

KEEPALIVE_S = 15  # an SSE comment line this often keeps proxies from closing an idle stream
RECHECK_S = 10  # an idle event stream re-reads the record this often (a job gone or from before events)
log = logging.getLogger("ray.serve")


class _HoldsLease:
    """A response that gives its owner's slot back when it ends, however it ends (also when the
    client was gone before its first byte, so its body never ran)."""

    lease: Lease

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)  # type: ignore[misc]
        finally:
            await self.lease.release()


class LeasedEventSourceResponse(_HoldsLease, EventSourceResponse):
    """The job's event stream, holding one of its owner's slots."""

    def __init__(self, lease: Lease, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lease = lease


async def reserve(ctx: Context, owner: str) -> Lease:
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


async def event_stream(ctx: Context, record: JobRecord, after: str, lease: Lease) -> AsyncIterator[ServerSentEvent]:
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
                if now.status.terminal:  # the script that set the status appended its event: read it now
                    events = await ctx.store.read_events(record.id, after)
                    if not events:  # resumed after the terminal event (or past its id): nothing more will come
                        return
            for event in events:
                yield await render(ctx, record, event)
                after = event.id or after
                if event.kind.terminal:
                    return
    except RedisError as e:
        log.warning("job %s: event stream ended by a Redis error: %s", record.id, type(e).__name__)
    finally:
        await lease.release()


async def render(ctx: Context, record: JobRecord, event: JobEvent) -> ServerSentEvent:
    """An event as sent: queued and terminal events carry the job view (the terminal one as the
    job is now, with fresh result URLs), the others their stored data."""
    if event.kind == EventKind.queued:
        data = queued_view(record.id, record.params, record.created_at).model_dump_json()
    elif event.kind.terminal:
        now = await ctx.store.get(record.id) or dataclasses.replace(record, status=JobStatus(event.kind.value))
        data = (await view(now, ctx)).model_dump_json()
    else:
        data = event.data
    return ServerSentEvent(data=data, event=event.kind.value, id=event.id or None)


async def leased(chunks: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    """chunks, while the lease holds; the slot is given back when they end or the client goes."""
    try:
        async for chunk in chunks:
            if not await lease.keep():
                return  # lapsed: the slot may be another response's now (the client sees a short body)
            yield chunk
    finally:
        await lease.release()


class TimedStreamingResponse(_HoldsLease, StreamingResponse):
    """A StreamingResponse holding one of its owner's slots, whose every send must finish within
    send_timeout seconds: a client that stops reading gives the slot back instead of holding it."""

    def __init__(self, content: AsyncGenerator[bytes, None], lease: Lease, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.lease = lease
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        async def timed(message: Message) -> None:
            with anyio.fail_after(self.send_timeout):
                await send(message)

        try:
            await super().stream_response(timed)
        finally:  # closed now, not when collected: its cleanup gives the owner's slot back
            await self.body_iterator.aclose()
