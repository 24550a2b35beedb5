"""One delivery attempt: the payload, and a signed POST to the checked address.

The payload follows the Standard Webhooks convention: {"type": "job.<event>", "timestamp":
<when the event happened, ISO 8601>, "data": {...the job...}}. The POST connects to an address
that service.webhooks.addresses has just checked (the URL's host goes in the Host header and,
for https, in TLS SNI and certificate verification), follows no redirect (a 3xx is a failed
attempt), keeps no connection alive (a pooled connection could carry one host's request to
another host on the same address), reads no response body, and is cut off after
Settings.webhook_timeout_seconds in all, however slowly the receiver drips.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from datetime import datetime, timezone

import httpx

from service.jobs.store import JobRecord
from service.jobs.webhook_schedule import EVENT_STATUS
from service.webhooks.addresses import AddressRefused, Guard, checked_addresses

USER_AGENT = "undiffuse-webhooks/1"


@dataclass(frozen=True)
class Attempt:
    status_code: int | None  # the receiver's answer; None when there was none
    error: str | None  # why it failed, in a few words (None: delivered)

    @property
    def delivered(self) -> bool:
        return self.error is None


def message_id(job_id: str, event: str) -> str:
    """webhook-id: one per (job, event), the same on every attempt, so receivers deduplicate."""
    return f"msg_{job_id}_{event}"


def payload(event: str, record: JobRecord, at: float, manifest_url: str | None) -> str:
    """The body of an event's delivery: the job as it is now, with the status the event reports
    (a `started` delivery says running even if the job has ended since)."""
    data: dict = {
        "id": record.id,
        "status": EVENT_STATUS[event],
        "created_at": record.created_at,
        "started_at": record.started_at,
    }
    if event != "started":
        failed = event in ("failed", "canceled")  # their images are deleted
        data |= {
            "finished_at": record.finished_at,
            "progress": {
                "images_done": record.images_done,
                "images_total": record.params.num_images,
                "step": record.step,
                "steps": record.params.steps,
            },
            "results_count": 0 if failed else record.images_done,
            "manifest_url": manifest_url if event == "succeeded" else None,
            "error": record.error.model_dump() if record.error else None,
        }
    stamp = datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return json.dumps({"type": f"job.{event}", "timestamp": stamp, "data": data}, separators=(",", ":"))


def client(verify: ssl.SSLContext | bool = True) -> httpx.AsyncClient:
    """The dispatcher's HTTP client: no redirects, no keep-alive, no proxies from the environment;
    https receivers are verified against certifi's roots (`verify`: another trust store, tests)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        verify=verify,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": USER_AGENT},
    )


async def post(
    http: httpx.AsyncClient,
    url: str,
    body: str,
    headers: dict[str, str],
    timeout: float,
    guard: Guard,
    owner: str | None = None,
) -> Attempt:
    """POST body to url (checked by guard, its lookup in owner's budget, and pinned to one of
    its addresses) within timeout seconds."""
    try:
        ips = await checked_addresses(url, guard, owner)
    except AddressRefused as e:
        return Attempt(None, f"refused: {e}")
    target = httpx.URL(url)
    pinned = target.copy_with(host=str(ips[0]))
    request = http.build_request(
        "POST",
        pinned,
        content=body.encode(),
        headers={**headers, "Host": target.netloc.decode("ascii"), "Content-Type": "application/json"},
        extensions={"sni_hostname": target.host, "timeout": httpx.Timeout(timeout).as_dict()},
    )
    try:
        response = await asyncio.wait_for(_send(http, request), timeout)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return Attempt(None, f"timed out after {timeout:g} s")
    except httpx.HTTPError as e:
        return Attempt(None, f"{type(e).__name__}: {e}"[:200])
    if 200 <= response.status_code < 300:
        return Attempt(response.status_code, None)
    if response.is_redirect:
        return Attempt(response.status_code, f"HTTP {response.status_code}: redirects are not followed")
    return Attempt(response.status_code, f"HTTP {response.status_code}")


async def _send(http: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
    response = await http.send(request, stream=True)
    await response.aclose()  # the body is not read
    return response
