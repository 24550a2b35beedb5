"""The job API's errors: 422s shaped like FastAPI's own, and the app-level answers to what the
job store raises (no route repeats them)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.jobs.store import IdempotencyConflict, JobFinished, JobNotFound

NOT_FOUND = "job not found"


def invalid(field: str, message: str, value: Any, location: str = "body") -> RequestValidationError:
    """A 422 shaped like FastAPI's own: detail[0].loc names the field."""
    return RequestValidationError([{"type": "value_error", "loc": (location, field), "msg": message, "input": value}])


def register(app: FastAPI) -> None:
    """404 for a job that is not the caller's (or not a job id), 409 for one already finished
    and for an Idempotency-Key used with another body."""

    @app.exception_handler(JobNotFound)
    async def not_found(_request: Request, _exc: JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": NOT_FOUND}, status_code=status.HTTP_404_NOT_FOUND)

    @app.exception_handler(JobFinished)
    async def finished(_request: Request, exc: JobFinished) -> JSONResponse:
        return JSONResponse({"detail": f"job already {exc.status.value}"}, status_code=status.HTTP_409_CONFLICT)

    @app.exception_handler(IdempotencyConflict)
    async def reused_key(_request: Request, _exc: IdempotencyConflict) -> JSONResponse:
        return JSONResponse(
            {"detail": "Idempotency-Key was already used with a different body"}, status_code=status.HTTP_409_CONFLICT
        )
