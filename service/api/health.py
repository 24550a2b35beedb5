"""/healthz (the process is up) and /readyz (Redis, S3 and the Denoiser answer; model folders
that were skipped are named).

/readyz answers anyone, so its answer is kept for READY_CACHE_SECONDS per ingress replica and
requests that arrive while the checks run wait for them: a flood of /readyz costs each
dependency at most one probe per replica per second, not one per request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Context, Ctx

router = APIRouter(tags=["health"])
log = logging.getLogger("ray.serve")
CHECK_TIMEOUT_S = 5.0
READY_CACHE_SECONDS = 1.0
clock = time.monotonic


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def _check(name: str, probe) -> tuple[str, str]:
    """("ok") or ("unavailable: <error type>"): the details, which name internal addresses, go
    to the log only — /readyz answers anyone."""
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
        return name, "ok"
    except Exception as e:  # any failure means "not ready"
        log.warning("readiness check %s failed: %s: %s", name, type(e).__name__, e)
        return name, f"unavailable: {type(e).__name__}"


@router.get(
    "/readyz",
    responses={
        200: {"description": "Redis, S3 and the Denoiser answer"},
        503: {"description": "a dependency does not answer; `checks` says which"},
    },
)
async def readyz(ctx: Ctx) -> JSONResponse:
    status_code, body = await _readiness(ctx)
    return JSONResponse(body, status_code=status_code)


@dataclass
class _Readiness:
    """The last answer of one context's checks, and the lock its next checks run under."""

    context: Context
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    answer: tuple[int, dict] | None = None
    at: float = 0.0

    def fresh(self) -> tuple[int, dict] | None:
        return self.answer if self.answer is not None and clock() - self.at < READY_CACHE_SECONDS else None


_readiness_of: _Readiness | None = None  # a replica has one context; a new one starts afresh


async def _readiness(ctx: Context) -> tuple[int, dict]:
    global _readiness_of
    state = _readiness_of
    if state is None or state.context is not ctx:
        state = _readiness_of = _Readiness(ctx)
    if (answer := state.fresh()) is not None:
        return answer
    async with state.lock:
        if (answer := state.fresh()) is None:
            answer = await _probe(ctx)
            state.answer, state.at = answer, clock()  # fresh from when it was known, however long it took
        return answer


async def _probe(ctx: Context) -> tuple[int, dict]:
    async def denoiser() -> None:
        if ctx.denoiser is None:
            raise RuntimeError("no Denoiser handle")
        await ctx.denoiser.ready.remote()

    checks = dict(
        await asyncio.gather(
            _check("redis", ctx.store.ping),
            _check("s3", lambda: asyncio.to_thread(ctx.objects.ping)),
            _check("sampler", denoiser),  # the key API users see; the Denoiser replicas answer it
        )
    )
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not ready", "checks": checks}
    if ctx.registry.skipped:  # served without them; the reasons are in the log
        body["skipped_models"] = sorted(ctx.registry.skipped)
    return (200 if ok else 503), body
