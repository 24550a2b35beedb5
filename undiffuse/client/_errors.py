"""What the client raises: one exception class per kind of refusal, built from a response's
status, body and Retry-After."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, Protocol


class UndiffuseError(Exception):
    """Anything this client raises on purpose."""


class APIError(UndiffuseError):
    """The server answered with an error status; `message` is its own explanation."""

    def __init__(self, status_code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {message}")
        self.status_code = status_code
        self.message = message
        self.retry_after = retry_after


class AuthenticationError(APIError):
    """401: no key, or a key the server does not know."""


class NotFoundError(APIError):
    """404: no such job for this key."""


class ConflictError(APIError):
    """409: e.g. cancel a finished job, delete an active one, an archive of an unfinished one."""


class ValidationError(APIError):
    """422: a field's value was refused; the message names the field and the reason."""


class RateLimitError(APIError):
    """429: over a per-key quota; retry after `retry_after` seconds."""


class UnavailableError(APIError):
    """503: a dependency (Redis, S3) is away; nothing was lost, retry after `retry_after`."""


class ChecksumError(UndiffuseError):
    """A downloaded image does not match the SHA-256 or size in the job's manifest."""


class WaitTimeout(UndiffuseError, TimeoutError):
    """`wait` gave up before the job finished (the job goes on running)."""


ERRORS: dict[int, type[APIError]] = {
    401: AuthenticationError,
    404: NotFoundError,
    409: ConflictError,
    422: ValidationError,
    429: RateLimitError,
    503: UnavailableError,
}


def error_message(text: str, reason: str = "") -> str:
    """The server's explanation: FastAPI's `detail` (a string, or field errors as 'loc: msg'),
    else the start of the body (storage hosts answer in XML), else the reason phrase."""
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        return text.strip()[:300] or reason
    if isinstance(detail, list):  # 422: [{"loc": ["body", "num_images"], "msg": "..."}]
        return "; ".join(_field_error(item) for item in detail)
    return str(detail)


def _field_error(item: Any) -> str:
    if not isinstance(item, dict):
        return str(item)
    loc = [str(p) for p in item.get("loc", []) if p not in ("body", "query", "path")]
    return f"{'.'.join(loc)}: {item.get('msg', '')}" if loc else str(item.get("msg", ""))


def api_error(status_code: int, text: str, reason: str = "", retry_after: float | None = None) -> APIError:
    """The exception for an error response, of the class its status names."""
    return ERRORS.get(status_code, APIError)(status_code, error_message(text, reason), retry_after)


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Retry-After (RFC 9110 10.2.3) in seconds from now: delay-seconds or an HTTP date; None
    when absent or unreadable. A date in the past is 0."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now())


class _Response(Protocol):  # what both transports' httpx.Response offers
    status_code: int
    text: str
    reason_phrase: str
    headers: Any


def response_error(response: _Response) -> APIError | None:
    """The exception an answer stands for, or None for a success (2xx)."""
    if 200 <= response.status_code < 300:
        return None
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    return api_error(response.status_code, response.text, response.reason_phrase, retry_after)
