"""The run loop every Worker task shares (the consumer, the sweeper, the webhook dispatcher).

A loop runs rounds until it is stopped. A round returns how long to wait before the next one
(None or 0: go on at once). A dependency that is away (Redis, S3: the errors the caller names)
is logged and waited out with capped exponential backoff, reset by the next round that
succeeds; any other error is logged with its traceback and the loop goes on after
`error_wait`, since a Worker replica's health depends on its loops never dying. The waits end
early when the loop is stopped, or when its `wake` event is set (something the next round
should see at once: a freed slot, say).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from redis.exceptions import RedisError

log = logging.getLogger("ray.serve")
Round = Callable[[], Awaitable[float | None]]


async def run_until_stopped(
    name: str,
    round_: Round,
    stopping: asyncio.Event,
    *,
    wake: asyncio.Event | None = None,
    dependency_errors: tuple[type[BaseException], ...] = (RedisError,),
    backoff: tuple[float, float] = (0.5, 10.0),
    error_wait: float = 1.0,
) -> None:
    """Run `round_` until `stopping` is set (see the module docstring). backoff: (first wait,
    longest wait) after dependency errors in a row; `wake` is cleared before each round."""
    first, longest = backoff
    delay = first
    while not stopping.is_set():
        if wake is not None:
            wake.clear()
        try:
            wait = await round_()
            delay = first
        except dependency_errors as e:
            log.warning("%s: %s (%s); retrying in %.1f s", name, type(e).__name__, e, delay)
            wait, delay = delay, min(2 * delay, longest)
        except Exception:
            log.exception("%s: unexpected error", name)
            wait = error_wait
        await _wait(wait or 0.0, stopping, wake)


async def _wait(seconds: float, *events: asyncio.Event | None) -> None:
    """Sleep up to seconds, less if one of events is set; always yield to the event loop once."""
    watched = [event for event in events if event is not None]
    if seconds <= 0 or any(event.is_set() for event in watched):
        await asyncio.sleep(0)
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in watched]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
