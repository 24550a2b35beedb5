"""When to send a request again, and after how long.

Retried: a connection that failed or dropped, and the answers that mean "not now" — 408, 429,
502, 503, 504. The wait is the server's Retry-After when it gives one (seconds or an HTTP date,
up to `max_retry_after`; beyond that the error is raised at once, with `retry_after` for the
caller to act on) and otherwise full jitter: uniform in [0, min(cap, base * 2^(n-1))] before
the n-th retry, so that clients refused together do not come back together.

A request that may have been acted on is sent again only if doing so is harmless (its
`idempotent`: GET, DELETE, or a submission with an Idempotency-Key). Any request is retried
when it never left (the connection could not be made) or when the answer says it was not acted
on (408, 429, 503); 502, 504 and a connection dropped mid-request leave that unknown.

The loop itself is stamina's (attempts, sleeping, instrumentation, `stamina.set_testing`);
this module only decides.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import stamina

from undiffuse.client._errors import APIError

RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
NOT_ACTED_ON = frozenset({408, 429, 503})
# the request never reached the server: nothing to repeat
NEVER_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# the connection failed while the request or its answer was under way
MAYBE_ACTED_ON = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


def may_have_acted(error: BaseException) -> bool:
    """Whether an attempt that failed so may have reached the server and been carried out."""
    if isinstance(error, APIError):
        return error.status_code in RETRY_STATUSES - NOT_ACTED_ON  # 502, 504: a proxy lost the answer
    return isinstance(error, MAYBE_ACTED_ON) and not isinstance(error, NEVER_SENT)


def done_by_an_earlier_send(request_gone_means_done: bool, acted: bool, status_code: int) -> bool:
    """A DELETE resent after a send that may have been carried out, answered 404: that earlier
    send deleted it, so the call succeeded."""
    return request_gone_means_done and acted and status_code == 404


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4  # sends in all: the first and three retries
    base: float = 0.5
    cap: float = 8.0
    max_retry_after: float = 30.0

    def backoff(self, retry: int, rng: Callable[[], float] = random.random) -> float:
        """Full jitter before the `retry`-th retry (1-based)."""
        return rng() * min(self.cap, self.base * 2 ** (retry - 1))

    def delay(
        self, error: BaseException, retry: int, idempotent: bool, rng: Callable[[], float] = random.random
    ) -> float | None:
        """Seconds to wait before the `retry`-th retry after `error`, or None: raise it."""
        if retry >= self.attempts:
            return None
        if isinstance(error, APIError):
            if error.status_code not in RETRY_STATUSES:
                return None
            if not idempotent and error.status_code not in NOT_ACTED_ON:
                return None
            if error.retry_after is not None:
                return error.retry_after if error.retry_after <= self.max_retry_after else None
            return self.backoff(retry, rng)
        if isinstance(error, NEVER_SENT) or (idempotent and isinstance(error, MAYBE_ACTED_ON)):
            return self.backoff(retry, rng)
        return None

    def hook(self, idempotent: bool) -> Callable[[Exception], bool | float]:
        """A stamina backoff hook for one request: False to raise, else the seconds to wait.
        Stateful (it counts the retries), so a new one for every request."""
        retries = 0

        def decide(error: Exception) -> bool | float:
            nonlocal retries
            retries += 1
            wait = self.delay(error, retries, idempotent)
            return False if wait is None else wait

        return decide

    def retrying(self, idempotent: bool):
        """stamina's loop for one request, with this policy's decisions: `for attempt in ...:`
        in sync code, `async for attempt in ...:` in async code, each `with attempt: send`."""
        return stamina.retry_context(on=self.hook(idempotent), attempts=self.attempts, timeout=None)


def policy(retries: int) -> RetryPolicy:
    """The default policy with `retries` retries (0: every request is sent once)."""
    if retries < 0:
        raise ValueError(f"retries must be >= 0, got {retries}")
    return RetryPolicy(attempts=retries + 1)
