"""What routes depend on: the per-replica context and the caller's identity."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import api_keys
from service.api.quotas import DailyCostQuota, PerMinuteQuota, quota_storage, read_quota, submission_quota
from service.jobs.lifecycle import JobLifecycle
from service.jobs.slots import OwnerSlots
from service.jobs.store import JobNotFound, JobRecord, JobStore
from service.keyring import KeyRing
from service.models import ModelRegistry
from service.settings import Settings
from service.storage import ObjectStore


@dataclass
class Context:
    """Everything a route needs, built once per ingress replica."""

    settings: Settings
    store: JobStore
    lifecycle: JobLifecycle
    objects: ObjectStore
    registry: ModelRegistry
    denoiser: Any  # a DeploymentHandle to the Denoiser (None when run without Serve)
    keyring: KeyRing | None = None  # keys added and revoked at run time; get_owner refuses every key without it
    quota: PerMinuteQuota | None = None  # submissions (None: no rate limit)
    slots: Any = None  # service.jobs.slots.OwnerSlots: event streams and archive downloads per owner
    reads: PerMinuteQuota | None = None  # None: reads are not rate-limited
    daily_cost: DailyCostQuota | None = None  # None: no daily image-steps quota


def build_context(settings: Settings, denoiser: Any, listeners: list | None = None) -> Context:
    """The context of one ingress replica (the Ingress deployment; the tests' in-process API).
    listeners: the job lifecycle's (default: its metrics)."""
    store = JobStore.from_settings(settings)
    limits = quota_storage(settings)
    return Context(
        settings=settings,
        store=store,
        lifecycle=JobLifecycle(store, listeners, purge_delay_seconds=settings.purge_delay_seconds),
        objects=ObjectStore(settings.storage),
        registry=ModelRegistry(settings.model_dir, settings.default_model),
        denoiser=denoiser,
        quota=submission_quota(settings, limits),
        keyring=KeyRing(store.r),
        reads=read_quota(settings, limits),
        daily_cost=DailyCostQuota(settings, limits),
        slots=OwnerSlots(store.r, settings.max_event_streams_per_key),
    )


_context: Context | None = None


def set_context(context: Context) -> None:
    """Called once by the ingress replica's constructor. (Serve runs a copy of the FastAPI app,
    so app.state set in the constructor is not the state the routes see.)"""
    global _context
    _context = context


def get_context() -> Context:
    if _context is None:
        raise RuntimeError("the ingress context is not initialised")
    return _context


Ctx = Annotated[Context, Depends(get_context)]
log = logging.getLogger("ray.serve")
ANONYMOUS = "anonymous"


BEARER = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
UNAUTHORIZED = {401: {"description": "missing or invalid API key"}}


async def get_owner(
    request: Request, ctx: Ctx, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
) -> str:
    """With API keys anywhere, require `Authorization: Bearer <key>` of a key that is configured
    (UNDIFFUSE_API_KEYS, service.api_keys) or in the key ring (service.keyring) and not revoked there;
    the owner is the id its entry gives it, so a key sees only its owner's jobs.

    Without any key, neither configured nor ever added to the ring, everyone is the same owner
    (development). A ring that holds only revoked keys still requires a key: revoking the last
    key must shut everyone out, not open the service. The ring is read through the replica's
    copy (at most a second old); a Redis error propagates (503), never as "no keys"."""
    if ctx.keyring is None:
        raise RuntimeError("the ingress context has no key ring")
    ring = await ctx.keyring.snapshot()
    configured = ctx.settings.key_owners
    if not configured and ring.empty:
        return ANONYMOUS
    if bearer is None:  # HTTPBearer compares the scheme case-insensitively (RFC 9110)
        _refuse(request, "missing", None, "missing Authorization: Bearer <api key>")
    # lookups by the key's SHA-256: what a timing difference could reveal is a prefix of a hash
    key_digest = api_keys.digest(bearer.credentials.strip())
    if key_digest in ring.revoked:
        _refuse(request, "revoked", key_digest, "API key revoked")
    owner = configured.get(key_digest) or ring.owners.get(key_digest)
    if owner is None:
        _refuse(request, "invalid", key_digest, "invalid API key")
    return owner


def _refuse(request: Request, reason: str, key_digest: str | None, detail: str) -> NoReturn:
    """Count and log a refused key, naming it by 8 hex digits of its digest (enough to tell
    keys apart in a log, useless to present), never by the key."""
    from service import metrics  # Ray's metrics API, loaded at the first refusal: the HTTP layer imports no Ray

    metrics.auth_failures_total().inc(tags={"reason": reason})
    client = request.client.host if request.client else "-"
    log.warning(
        "API key refused (%s): digest %s, %s %s from %s",
        reason,
        key_digest[:8] if key_digest else "-",
        request.method,
        request.url.path,
        client,
    )
    raise HTTPException(status.HTTP_401_UNAUTHORIZED, detail, {"WWW-Authenticate": "Bearer"})


Owner = Annotated[str, Depends(get_owner)]


async def get_reader(ctx: Ctx, owner: Owner) -> str:
    """The owner, once a read is counted against its reads-per-minute quota (429 past it)."""
    if ctx.reads is not None:
        await ctx.reads.spend(owner)
    return owner


Reader = Annotated[str, Depends(get_reader)]


JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex, as the job store makes them


def known_format(job_id: str) -> str:
    """A job id of the form the service issues; anything else is not found before Redis is asked
    (an id like '<job>:done' would otherwise name another key, and reveal that it exists)."""
    if not JOB_ID.fullmatch(job_id):
        raise JobNotFound(job_id)
    return job_id


async def get_owned_job(job_id: str, ctx: Ctx, owner: Reader) -> JobRecord:
    """The caller's job `job_id`, read as one of its reads; JobNotFound (404) for anyone else's."""
    return await ctx.store.get_owned(known_format(job_id), owner)


async def get_managed_job(job_id: str, ctx: Ctx, owner: Owner) -> JobRecord:
    """The caller's job, for a change to it (not counted as a read)."""
    return await ctx.store.get_owned(known_format(job_id), owner)


OwnedJob = Annotated[JobRecord, Depends(get_owned_job)]
ManagedJob = Annotated[JobRecord, Depends(get_managed_job)]
