"""The webhook dispatcher: sends the deliveries that are due (service.jobs.webhooks).

Each Worker replica runs one, beside its consumer and sweeper. A round claims what is due (the
claim leases each delivery, so two replicas never send the same attempt at once), and sends each
in its own task, at most Settings.webhook_concurrency at a time, so one slow receiver does not
hold up the others. An attempt that fails is rescheduled after the next delay of
RETRY_SCHEDULE (with jitter), until the last; each attempt's outcome is written on the job.
"""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from service import metrics
from service.jobs.store import JobStore
from service.jobs.webhooks import WebhookOutcome, retry_delay
from service.settings import Settings
from service.storage import ObjectStore, manifest_key
from service.webhooks import sender, signing
from service.webhooks.addresses import Guard

log = logging.getLogger("ray.serve")
POLL_S = 1.0  # the longest a newly due delivery waits for a round


class Dispatcher:
    def __init__(self, settings: Settings, store: JobStore, objects: ObjectStore, record_metrics: bool = True) -> None:
        self.settings = settings
        self.store = store
        self.schedule = store.webhooks
        self.objects = objects
        self.record_metrics = record_metrics
        # a claimed delivery is hidden this long: the lookup and the POST fit well inside it
        self.lease = 2 * settings.webhook_timeout_seconds + settings.webhook_resolve_timeout_seconds + 30
        self.guard = Guard.from_settings(settings)
        self.inflight: set[asyncio.Task] = set()
        self.stopping = asyncio.Event()
        self.http = sender.client()

    async def run(self) -> None:
        backoff = 0.5
        while not self.stopping.is_set():
            wait = POLL_S
            try:
                await self.dispatch_once()
                due = await self.schedule.next_due()
                if due is not None:
                    wait = min(POLL_S, max(0.02, due - time.time()))
                backoff = 0.5
            except RedisError as e:  # Redis away: claimed deliveries come due again when their lease ends
                log.warning("webhooks: Redis unavailable (%s); retrying in %.1fs", e, backoff)
                wait, backoff = backoff, min(backoff * 2, 10.0)
            except Exception:
                log.exception("webhooks: unexpected error")
            try:
                await asyncio.wait_for(self.stopping.wait(), wait)
            except asyncio.TimeoutError:
                pass

    async def dispatch_once(self) -> int:
        """Claim what is due (as many as there are free slots) and start sending it."""
        free = self.settings.webhook_concurrency - len(self.inflight)
        if free <= 0:
            return 0
        claimed = await self.schedule.claim(time.time(), self.lease, free)
        for job_id, event in claimed:
            task = asyncio.create_task(self._deliver_logged(job_id, event))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)
        return len(claimed)

    async def drain(self, timeout: float) -> None:
        """Stop claiming, give attempts in flight up to timeout seconds, close the client."""
        self.stopping.set()
        if self.inflight:
            await asyncio.wait(self.inflight, timeout=timeout)
        await self.http.aclose()

    async def _deliver_logged(self, job_id: str, event: str) -> None:
        try:
            await self.deliver(job_id, event)
        except Exception as e:  # Redis away mid-attempt: the lease runs out and the next attempt goes
            log.warning("webhooks: job %s %s: %s: %s", job_id, event, type(e).__name__, e)

    async def deliver(self, job_id: str, event: str) -> WebhookOutcome | None:
        """One attempt of a claimed delivery; its outcome as stored (None: nothing to send)."""
        outcome = await self.schedule.begin(job_id, event)
        record = await self.store.get(job_id) if outcome is not None else None
        if outcome is None or record is None or not record.webhook_url:
            await self.schedule.drop(job_id, event)  # the job was deleted, or the delivery had ended
            self._count("dropped")
            return None
        secrets = signing.owner_secrets(self.settings, record.owner)
        if secrets:
            manifest_url = self.objects.presign(manifest_key(job_id)) if event == "succeeded" else None
            body = sender.payload(event, record, outcome.created_at, manifest_url)
            headers = signing.signed_headers(secrets, sender.message_id(job_id, event), body)
            attempt = await sender.post(
                self.http,
                record.webhook_url,
                body,
                headers,
                timeout=self.settings.webhook_timeout_seconds,
                guard=self.guard,
                owner=record.owner,
            )
        else:  # webhooks were turned off (production without a signing key) after it was scheduled
            attempt = sender.Attempt(None, "webhooks are not enabled on this server")
        now = time.time()
        outcome.last_status_code, outcome.last_error = attempt.status_code, attempt.error
        delay = (
            None
            if attempt.delivered or not secrets
            else retry_delay(outcome.attempts, self.settings.webhook_retry_base_seconds)
        )
        if attempt.delivered:
            outcome.status, outcome.delivered_at, outcome.next_attempt_at = "delivered", now, None
        elif delay is None:
            outcome.status, outcome.next_attempt_at = "failed", None
        else:
            outcome.next_attempt_at = now + delay
        if await self.schedule.finish(job_id, outcome):
            self._count("delivered" if attempt.delivered else "retried" if outcome.status == "pending" else "failed")
        log.info(
            "webhook %s of job %s: attempt %d %s%s",
            event,
            job_id,
            outcome.attempts,
            outcome.status,
            f" ({attempt.error})" if attempt.error else "",
        )
        return outcome

    def _count(self, outcome: str) -> None:
        if self.record_metrics:
            metrics.webhook_deliveries_total().inc(tags={"outcome": outcome})
