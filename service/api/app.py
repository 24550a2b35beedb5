"""The FastAPI application: routers, the body-size limit and the error mapping."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api import catalog, health, jobs
from service.api.deps import get_context

DESCRIPTION = """Submit image-generation jobs, poll them, and download the PNGs from S3-compatible
storage through presigned URLs. See the README for a curl session."""


def create_app() -> FastAPI:
    app = FastAPI(title="undiffuse", version="0.1.0", description=DESCRIPTION)
    app.include_router(jobs.router)
    app.include_router(catalog.router)
    app.include_router(health.router)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        limit = get_context().settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"request body is {length} bytes; the limit is {limit}"}, status_code=413)
        if request.method in ("POST", "PUT", "PATCH") and length is None:
            body = await request.body()  # chunked upload: count what actually arrived
            if len(body) > limit:
                return JSONResponse({"detail": f"request body exceeds the limit of {limit} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def redis_down(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "job store unavailable: Redis is unreachable; nothing was queued, retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    return app


app = create_app()
