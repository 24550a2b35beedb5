"""/healthz (the process is up) and /readyz (Redis, S3 and the Denoiser answer)."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from service.api.deps import Ctx

router = APIRouter(tags=["health"])
log = logging.getLogger("ray.serve")
CHECK_TIMEOUT_S = 5.0


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
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503)
