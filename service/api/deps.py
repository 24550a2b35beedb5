"""What routes depend on: the per-replica context and the caller's identity."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, HTTPException, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service import keys
from service.api.quotas import SubmissionQuota
from service.jobs.lifecycle import JobLifecycle
from service.jobs.store import JobStore
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
    quota: Any = None  # service.api.quotas.SubmissionQuota (None: no rate limit)
    open_streams: Counter = field(default_factory=Counter)  # owner -> event streams open on this replica


def build_context(settings: Settings, denoiser: Any, listeners: list | None = None) -> Context:
    """The context of one ingress replica (the Ingress deployment; the tests' in-process API).
    listeners: the job lifecycle's (default: its metrics)."""
    store = JobStore.from_settings(settings)
    return Context(
        settings=settings,
        store=store,
        lifecycle=JobLifecycle(store, listeners, purge_delay_seconds=settings.purge_delay_seconds),
        objects=ObjectStore(settings),
        registry=ModelRegistry(settings.model_dir, settings.default_model),
        denoiser=denoiser,
        quota=SubmissionQuota(settings),
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
ANONYMOUS = "anonymous"


BEARER = HTTPBearer(auto_error=False, description="an API key: Authorization: Bearer <key>")
UNAUTHORIZED = {401: {"description": "missing or invalid API key"}}


def get_owner(ctx: Ctx, bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> str:
    """With API keys configured, require `Authorization: Bearer <key>`; the owner is the id its
    configuration entry gives it (service.keys), so a key sees only its owner's jobs. Without
    keys everyone is the same owner."""
    owners = ctx.settings.key_owners
    if not owners:
        return ANONYMOUS
    challenge = {"WWW-Authenticate": "Bearer"}
    if bearer is None:  # HTTPBearer compares the scheme case-insensitively (RFC 9110)
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "missing Authorization: Bearer <api key>", challenge)
    # a lookup by the key's SHA-256: what a timing difference could reveal is a prefix of a hash
    owner = owners.get(keys.digest(bearer.credentials.strip()))
    if owner is None:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, "invalid API key", challenge)
    return owner


Owner = Annotated[str, Depends(get_owner)]
