"""The FastAPI application: routers, the body-size limit and the error mapping."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.encoders import jsonable_encoder
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError as RedisOutOfMemoryError
from redis.exceptions import ReadOnlyError as RedisReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api import catalog, errors, health, jobs, page, webhook_routes
from service.api.deps import get_context
from service.api.request_limits import RequestLimits, too_large
from service.storage import STORAGE_ERRORS

log = logging.getLogger("ray.serve")
DESCRIPTION = """Submit image-generation jobs, poll them, and download the PNGs from S3-compatible
storage through presigned URLs. See the README for a curl session."""


def create_app() -> FastAPI:
    app = FastAPI(title="undiffuse", version="0.1.0", description=DESCRIPTION, docs_url=None, redoc_url=None)
    app.include_router(jobs.router)
    app.include_router(webhook_routes.router)
    app.include_router(catalog.router)
    app.include_router(health.router)
    app.include_router(page.router)

    errors.register(app)
    app.add_middleware(RequestLimits, limit=lambda: get_context().settings.max_body_bytes)

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        """Swagger UI loads its scripts from a CDN onto this origin, where the web page may keep
        an API key: served in development only. /openapi.json is always there."""
        if get_context().settings.environment == "production":
            raise HTTPException(status.HTTP_404_NOT_FOUND, "Not Found")
        return get_swagger_ui_html(openapi_url="/openapi.json", title="undiffuse - API")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """FastAPI's own rendering, with the body limit named: a body cut as it arrives raises
        Starlette's bare 413."""
        if exc.status_code == 413:
            exc = StarletteHTTPException(413, too_large(get_context().settings.max_body_bytes))
        return await http_exception_handler(request, exc)

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

    @app.exception_handler(RedisOutOfMemoryError)
    async def redis_full(_request: Request, exc: Exception) -> JSONResponse:
        """Redis runs with maxmemory and noeviction: at its limit a write is refused whole (no
        key is evicted behind a job's back), and the request that needed it answers 503."""
        log.error("Redis is at maxmemory: %s", exc)
        return JSONResponse(
            {"detail": "job store is full; nothing was changed, retry later"},
            status_code=503,
            headers={"Retry-After": "30"},
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
    if isinstance(value, str):  # a lone surrogate echoed back would make the answer a 500
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_json_safe(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


app = create_app()
