"""The FastAPI application: routers, the body-size limit and the error mapping."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.api import catalog, health, jobs, page, webhooks
from service.api.deps import get_context
from service.storage import STORAGE_ERRORS

log = logging.getLogger("ray.serve")
MAX_HEADER_BYTES = 16 * 1024
DESCRIPTION = """Submit image-generation jobs, poll them, and download the PNGs from S3-compatible
storage through presigned URLs. See the README for a curl session."""


def create_app() -> FastAPI:
    app = FastAPI(title="undiffuse", version="0.1.0", description=DESCRIPTION)
    app.include_router(jobs.router)
    app.include_router(webhooks.router)
    app.include_router(catalog.router)
    app.include_router(health.router)
    app.include_router(page.router)

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        header_bytes = sum(len(k) + len(v) for k, v in request.scope.get("headers", []))
        if header_bytes > MAX_HEADER_BYTES:
            return JSONResponse(
                {"detail": f"request headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"},
                status_code=431,
            )
        limit = get_context().settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"request body is {length} bytes; the limit is {limit}"}, status_code=413)
        if request.method in ("POST", "PUT", "PATCH") and length is None:
            body = await request.body()  # chunked upload: count what actually arrived
            if len(body) > limit:
                return JSONResponse({"detail": f"request body exceeds the limit of {limit} bytes"}, status_code=413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        """FastAPI's 422, with inputs that JSON cannot carry (NaN, Infinity) written as text:
        echoing them as numbers made the error itself a 500."""
        return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    @app.exception_handler(RedisReadOnlyError)  # a replica promoted mid-failover: retry shortly
    async def redis_down(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"detail": "job store unavailable: Redis is unreachable; nothing was queued, retry later"},
            status_code=503,
            headers={"Retry-After": "5"},
        )

    async def storage_down(_request: Request, exc: Exception) -> JSONResponse:
        """The details (endpoint URLs) go to the log, not to the client."""
        log.warning("object storage error: %s: %s", type(exc).__name__, exc)
        return JSONResponse(
            {"detail": "object storage unavailable; retry later (a job is kept until its images are deleted)"},
            status_code=503,
            headers={"Retry-After": "10"},
        )

    for error in STORAGE_ERRORS:
        app.add_exception_handler(error, storage_down)
    return app


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


app = create_app()
