"""A Python client for the undiffuse HTTP API: `Client` (sync) and `AsyncClient`, on httpx.

    from undiffuse.client import Client

    with Client("http://127.0.0.1:8000", api_key="ud_...") as api:
        job = api.submit(num_images=8, class_label=7, steps=50)
        job = api.wait(job.id, on_event=lambda e: print(e.event, e.data))
        files = api.download(job.id, "sevens/")  # checked against the job's manifest

The two clients have the same methods; `AsyncClient`'s are awaited. `wait` follows the job's
server-sent events (GET /v1/jobs/{id}/events), reconnecting with Last-Event-ID when the
connection drops, and falls back to polling GET /v1/jobs/{id} against a server without the
event stream. `download` fetches the presigned URLs concurrently (without the API key: it never
leaves for the storage host), writes each file atomically, skips files already there with the
right checksum, and verifies every image's SHA-256 and size against the job's manifest.json.
Errors are raised with the server's own message (`APIError` and subclasses).

Retries (`retries=3` by default, through stamina): a connection that could not be made or
dropped, and the answers 408, 429, 502, 503 and 504, after the server's Retry-After or else an
exponential backoff with full jitter. A request that may have been acted on is sent again only
when that is harmless: GET, DELETE, and submissions, which always carry an Idempotency-Key.

The layout: `_requests` (every call as a value), `_retry` (when and how long), `_events` (the
reconnect, poll and deadline state machine), `_download` (paths, checks, atomic writes) hold no
I/O; `_sync` and `_async` are thin transports over them. Light on purpose: httpx, httpx-sse and
stamina, no torch, so scripts and the CLI's client commands start fast and install small.
"""

from undiffuse.client._async import AsyncClient
from undiffuse.client._errors import (
    APIError,
    AuthenticationError,
    ChecksumError,
    ConflictError,
    NotFoundError,
    RateLimitError,
    UnavailableError,
    UndiffuseError,
    ValidationError,
    WaitTimeout,
)
from undiffuse.client._requests import DEFAULT_URL, RESULTS_PAGE
from undiffuse.client._sync import Client
from undiffuse.client._types import TERMINAL, Download, ImageResult, Job, JobEvent, JobPage, JobSummary, Progress

__all__ = [
    "APIError",
    "AsyncClient",
    "AuthenticationError",
    "ChecksumError",
    "Client",
    "ConflictError",
    "DEFAULT_URL",
    "Download",
    "ImageResult",
    "Job",
    "JobEvent",
    "JobPage",
    "JobSummary",
    "NotFoundError",
    "Progress",
    "RESULTS_PAGE",
    "RateLimitError",
    "TERMINAL",
    "UnavailableError",
    "UndiffuseError",
    "ValidationError",
    "WaitTimeout",
]
