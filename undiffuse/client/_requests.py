"""Every call of the API as a value: method, path, query, body, headers, and how to read the
answer. Both transports send these, so the sync and async clients cannot disagree on what a
method sends or returns."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from undiffuse.client._types import Job, JobPage

DEFAULT_URL = "http://127.0.0.1:8000"
RESULTS_PAGE = 1024  # the server's largest results page
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


def _ignore(_: Any) -> None:
    return None


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    parse: Callable[[Any], Any] = _ignore  # the decoded JSON body to the method's result
    has_body: bool = True  # False: the answer has no JSON (204), parse gets None
    gone_means_done: bool = False  # a 404 after a resend means an earlier send did it (DELETE)

    @property
    def idempotent(self) -> bool:
        """Safe to send again after an answer that may mean it was acted on (RFC 9110 9.2.2):
        an idempotent method, or a POST that carries an Idempotency-Key, which the server
        answers with the one job however often it arrives."""
        return self.method in IDEMPOTENT_METHODS or "Idempotency-Key" in self.headers


def endpoint(url: str | None, api_key: str | None) -> tuple[str, dict[str, str]]:
    """The service's base URL and the API's headers: arguments, else $UNDIFFUSE_URL and
    $UNDIFFUSE_API_KEY, else the local stack without a key."""
    base = (url or os.environ.get("UNDIFFUSE_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("UNDIFFUSE_API_KEY")
    return base, ({"Authorization": f"Bearer {key}"} if key else {})


def submit(num_images: int, idempotency_key: str | None, params: dict[str, Any]) -> ApiRequest:
    """POST /v1/jobs, always with an Idempotency-Key (a random one unless given): a resend
    after a dropped connection or a 5xx then returns the one job instead of queueing two."""
    body = {"num_images": num_images, **{k: v for k, v in params.items() if v is not None}}
    headers = {"Idempotency-Key": idempotency_key or uuid.uuid4().hex}
    return ApiRequest("POST", "/v1/jobs", json=body, headers=headers, parse=Job.from_json)


def get(job_id: str, results_offset: int = 0, results_limit: int = RESULTS_PAGE) -> ApiRequest:
    params = {"results_offset": results_offset, "results_limit": results_limit}
    return ApiRequest("GET", f"/v1/jobs/{job_id}", params=params, parse=Job.from_json)


def list_jobs(status: str | None, limit: int, cursor: str | None) -> ApiRequest:
    params = {k: v for k, v in {"status": status, "limit": limit, "cursor": cursor}.items() if v is not None}
    return ApiRequest("GET", "/v1/jobs", params=params, parse=JobPage.from_json)


def cancel(job_id: str) -> ApiRequest:
    return ApiRequest("POST", f"/v1/jobs/{job_id}/cancel", parse=Job.from_json)


def delete(job_id: str) -> ApiRequest:
    return ApiRequest("DELETE", f"/v1/jobs/{job_id}", has_body=False, gone_means_done=True)


def models() -> ApiRequest:
    return ApiRequest("GET", "/v1/models", parse=lambda body: body["models"])


def webhook_secret() -> ApiRequest:
    return ApiRequest("GET", "/v1/webhook-secret", parse=lambda body: body["secret"])


def archive(job_id: str) -> ApiRequest:
    return ApiRequest("GET", f"/v1/jobs/{job_id}/archive", has_body=False)


def events(job_id: str, last_event_id: str | None) -> ApiRequest:
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    return ApiRequest("GET", f"/v1/jobs/{job_id}/events", headers=headers, has_body=False)


def storage(url: str) -> ApiRequest:
    """A presigned URL: sent without the API key, which never leaves for the storage host."""
    return ApiRequest("GET", url, has_body=False)
