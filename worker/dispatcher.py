"""The webhook dispatcher: sends the deliveries that are due (service.jobs.webhook_schedule).

Each Worker replica runs one, beside its consumer and sweeper. A round claims what is due (the
claim leases each delivery, so two replicas never send the same attempt at once), and sends each
in its own task, at most Settings.webhook_concurrency at a time, so one slow receiver does not
hold up the others; and at most Settings.webhook_concurrency_per_owner of one owner's, so an
owner whose receivers are slow or never answer (or whose names never resolve: the lookups have a
budget per owner too, service.webhooks.addresses) fills only its own slots, and other owners'
deliveries are claimed past its backlog (service.jobs.webhook_schedule parks it). An attempt that fails
is rescheduled after the next delay of RETRY_SCHEDULE (with jitter), until the last; each
attempt's outcome is written on the job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from service import metrics
from service.jobs.store import JobStore
from service.jobs.webhook_schedule import Claim, Delivery, WebhookOutcome, retry_delay
from service.settings import WebhookSettings
from service.storage import ObjectStore, manifest_key
from service.webhooks import sender, signing
from service.webhooks.addresses import Guard
from worker.loop import run_until_stopped

log = logging.getLogger("ray.serve")
POLL_S = 1.0  # the longest a newly due delivery waits for a round


class Dispatcher:
    def __init__(
        self, settings: WebhookSettings, store: JobStore, objects: ObjectStore, record_metrics: bool = True
    ) -> None:
        self.settings = settings
        self.store = store
        self.schedule = store.webhooks
        self.objects = objects
        self.record_metrics = record_metrics
        # a claimed delivery is hidden this long: the lookup and the POST fit well inside it
        self.lease = 2 * settings.timeout_seconds + settings.resolve_timeout_seconds + 30
        self.guard = Guard.from_settings(settings)
        self.inflight: set[asyncio.Task] = set()
        self.owners = Counter[str]()  # owner -> its deliveries in self.inflight
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()  # set when stopping or a slot frees
        self.http = sender.client()

    async def run(self) -> None:
        # Redis away: claimed deliveries come due again when their lease ends
        await run_until_stopped("webhooks", self._round, self.stopping, wake=self.wake, error_wait=POLL_S)

    async def _round(self) -> float:
        """Claim and start what is due; how long to wait before the next round."""
        claim = await self.dispatch_once()
        if claim.more:  # the claim stopped at its scan budget: go on at once
            return 0.0
        if len(self.inflight) < self.settings.concurrency:
            # nothing claimable is due now (what is due waits for its owner's slots: a freed slot
            # wakes the loop); sleep until the next entry comes due
            due = await self.schedule.next_due()
            if due is not None:
                return min(POLL_S, max(0.02, due - time.time()))
        return POLL_S

    async def dispatch_once(self) -> Claim:
        """Claim what is due (as many as there are free slots, each owner up to its own) and
        start sending it."""
        free = self.settings.concurrency - len(self.inflight)
        if free <= 0:
            return Claim([], False)
        claim = await self.schedule.claim(
            time.time(), self.lease, free, self.settings.concurrency_per_owner, self.owners
        )
        for delivery in claim.deliveries:
            self._start(delivery)
        return claim

    def _start(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._deliver_logged(delivery.job_id, delivery.event))
        self.inflight.add(task)
        self.owners[delivery.owner] += 1

        def done(task: asyncio.Task) -> None:
            self.inflight.discard(task)
            self.owners[delivery.owner] -= 1
            if self.owners[delivery.owner] <= 0:
                del self.owners[delivery.owner]
            self.wake.set()  # a slot is free: the owner's parked deliveries may go now

        task.add_done_callback(done)

    async def drain(self, timeout: float) -> None:
        """Stop claiming, give attempts in flight up to timeout seconds, close the client."""
        self.stopping.set()
        self.wake.set()
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
                timeout=self.settings.timeout_seconds,
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
            else retry_delay(outcome.attempts, self.settings.retry_base_seconds)
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
