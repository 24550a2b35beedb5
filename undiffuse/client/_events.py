"""Following a job's events, without I/O: what to ask for, what each server-sent event means,
and what to do when the stream ends early, is refused, or is missing.

A transport opens `request()` with `timeouts()`, reports the answer to `answered()`, hands each
event httpx-sse parsed to `received()`, and asks `next()` after the stream ended without the
terminal event. Against a server without the event stream (404/405 on it), or after
`RECONNECTS` failed reconnects in a row, it polls GET /v1/jobs/{id} instead and hands each view
to `polled()`. With a timeout, every one of these raises WaitTimeout once the deadline has
passed, and no connect, read or wait outlasts it: a queued job's stream carries nothing but
keep-alive comments, and waiting for the next one must not overrun the deadline.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from typing import Literal

from undiffuse.client import _requests
from undiffuse.client._errors import APIError, UndiffuseError, WaitTimeout
from undiffuse.client._requests import ApiRequest
from undiffuse.client._retry import RetryPolicy
from undiffuse.client._types import Job, JobEvent

CONNECT_TIMEOUT = 30.0
READ_TIMEOUT = 90.0  # the server sends a keep-alive comment every ~15 s
RECONNECTS = 5  # failed reconnects in a row before falling back to polling
RECONNECT_CAP = 8.0  # seconds: the longest wait before a reconnect
POLL_INTERVAL = 0.5
POLL: Literal["poll"] = "poll"


def polled_events(before: Job | None, now: Job) -> list[JobEvent]:
    """What changed between two polls, as the event stream would have said it."""
    events = []
    if before is None:
        events.append(JobEvent("queued", now.to_json()))
    if now.status != "queued" and (before is None or before.status == "queued"):
        events.append(JobEvent("started", {"status": "running"}))
    if before is None or now.progress != before.progress:
        events.append(JobEvent("progress", vars(now.progress)))
    if now.done:
        events.append(JobEvent(now.status, now.to_json()))
    return events


class EventFollower:
    """The state of one `events()` call: the last event id seen, the reconnects in a row, the
    deadline, the last polled view, and whether the terminal event has been seen."""

    def __init__(
        self,
        job_id: str,
        last_event_id: str | None = None,
        timeout: float | None = None,
        *,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.timeout = timeout
        self.reconnects = 0  # connections since the last event, dropped or refused
        self.refusals = 0  # of those, refused (503, 429, ...): what the retry policy bounds
        self.finished = False
        self._policy = policy or RetryPolicy()
        self._clock = clock
        self._rng = rng
        self._deadline = None if timeout is None else clock() + timeout
        self._before: Job | None = None

    # -- the deadline

    def left(self) -> float | None:
        """Seconds to the deadline (None without one); WaitTimeout once it has passed."""
        if self._deadline is None:
            return None
        remaining = self._deadline - self._clock()
        if remaining <= 0:
            raise WaitTimeout(f"job {self.job_id} did not finish within {self.timeout:g} s")
        return remaining

    def _bounded(self, seconds: float) -> float:
        left = self.left()
        return seconds if left is None else min(seconds, left)

    # -- the stream

    def request(self) -> ApiRequest:
        return _requests.events(self.job_id, self.last_event_id)

    def timeouts(self) -> tuple[float, float]:
        """(connect, read) timeouts for the next connection, neither past the deadline."""
        return self._bounded(CONNECT_TIMEOUT), self._bounded(READ_TIMEOUT)

    def answered(self, status_code: int, content_type: str) -> Literal["stream", "poll", "refused"]:
        if 200 <= status_code < 300:
            # a success that is no event stream: something in between, or a server without it
            return "stream" if content_type.startswith("text/event-stream") else POLL
        if status_code in (404, 405):
            return POLL  # no event stream here (an unknown job: the first poll says so)
        return "refused"

    def received(self, event: str, data: str, event_id: str) -> JobEvent | None:
        """The job event an SSE event carries, or None for a keep-alive. httpx-sse dispatches
        a comment followed by a blank line as an event with empty data once any id has been
        seen; by the spec an event without data is never dispatched, and the server's events
        all carry JSON."""
        self.left()
        if not data:
            return None
        try:
            body = json.loads(data)
        except ValueError:
            raise UndiffuseError(f"job {self.job_id}: event {event!r} does not carry JSON: {data[:80]!r}") from None
        if event_id:
            self.last_event_id = event_id
        self.reconnects = self.refusals = 0
        job_event = JobEvent(event, body, event_id or None)
        self.finished = job_event.terminal
        return job_event

    def next(self, refusal: APIError | None = None) -> float | Literal["poll"]:
        """After a connection that ended before the terminal event (refusal None: it dropped,
        or the server closed it) or was refused: seconds to wait before reconnecting, or POLL.
        A refusal the retry policy does not retry, or one too many, is raised."""
        self.reconnects += 1
        if refusal is not None:  # counted apart from drops: each has its own budget
            self.refusals += 1
            wait = self._policy.delay(refusal, self.refusals, idempotent=True, rng=self._rng)
            if wait is None or self.reconnects > RECONNECTS:
                raise refusal
            return self._bounded(wait)
        if self.reconnects > RECONNECTS:
            return POLL
        return self._bounded(self._rng() * min(RECONNECT_CAP, 0.5 * 2**self.reconnects))

    # -- polling

    def polled(self, job: Job) -> list[JobEvent]:
        events = polled_events(self._before, job)
        self._before = job
        self.finished = job.done
        return events

    def poll_wait(self) -> float:
        return self._bounded(POLL_INTERVAL)
