"""Per-owner slots for long responses (service.jobs.slots) on the real Redis-compatible server:
a limit no number of replicas can overshoot, leases that lapse, and slots given back by a
response that ends, is cancelled or stops being read."""

from __future__ import annotations

import asyncio

import pytest

from service.jobs import redis_keys
from service.jobs.connection import async_redis
from service.jobs.slots import OwnerSlots


def _url(store) -> str:
    kwargs = store.r.get_connection_kwargs()
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs['db']}"


def test_concurrent_requests_on_two_replicas_never_pass_the_limit(store, run):
    async def flood() -> list:
        replicas = [OwnerSlots(async_redis(_url(store), 2.0), limit=16) for _ in range(2)]
        leases = await asyncio.gather(*(replicas[i % 2].acquire("alice") for i in range(40)))
        other = await replicas[0].acquire("bob")  # per owner
        held = await replicas[1].held("alice")
        for r in replicas:
            await r.r.aclose()
        return [lease for lease in leases if lease], other, held

    taken, other, held = run(flood())
    assert len(taken) == 16 and other is not None and held == 16


def test_a_lapsed_lease_frees_its_slot_and_cannot_be_renewed(store, run):
    slots = OwnerSlots(store.r, limit=1, lease_seconds=0.3)
    first = run(slots.acquire("alice"))
    assert first is not None and run(slots.acquire("alice")) is None
    assert run(slots.renew("alice", first.token))
    run(asyncio.sleep(0.4))
    second = run(slots.acquire("alice"))  # the first lapsed (its replica died, say)
    assert second is not None and not run(slots.renew("alice", first.token))
    run(second.release())
    assert run(slots.held("alice")) == 0 and run(store.r.exists(redis_keys.owner_slots("alice"))) == 0


def test_a_response_that_stops_being_read_ends_and_gives_its_slot_back(store, run):
    """The archive's response: each send must finish within send_timeout; a client that stops
    reading ends it (TimeoutError) and its slot is released even though the task is failing."""
    from starlette.requests import ClientDisconnect

    from service.api.streams import TimedStreamingResponse
    from service.api.streams import leased as _leased

    slots = OwnerSlots(store.r, limit=1)

    async def chunks():
        while True:
            yield b"x" * 1024

    async def scenario() -> float:
        lease = await slots.acquire("alice")
        response = TimedStreamingResponse(_leased(chunks(), lease), lease=lease, send_timeout=0.2)
        sent = []

        async def send(message):
            sent.append(message)
            if len(sent) > 3:
                await asyncio.sleep(3600)  # the client stopped reading

        async def receive():
            await asyncio.sleep(3600)

        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ClientDisconnect):  # Starlette's word for a send that failed (TimeoutError is an OSError)
            await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send), 10)
        await asyncio.sleep(0.05)  # the generator's cleanup runs as it is closed
        return loop.time() - started

    took = run(scenario())
    assert took < 2
    assert run(slots.held("alice")) == 0


def test_a_held_lease_is_renewed_by_its_own_task_however_slow_the_response(store, run, monkeypatch):
    """A response stuck in one slow send does not let its lease lapse (the slot would go to
    another response, over the limit), and a released one stops renewing."""
    from service.jobs import slots as slots_module

    monkeypatch.setattr(slots_module, "RENEW_SECONDS", 0.1)
    slots = OwnerSlots(store.r, limit=1, lease_seconds=0.3)

    async def scenario():
        lease = await slots.acquire("alice")
        await asyncio.sleep(1.0)  # three lease lifetimes, the response doing nothing meanwhile
        still = await lease.keep(), await slots.acquire("alice")
        await lease.release()
        await asyncio.sleep(0.2)
        return still, await slots.held("alice")

    (held, second), after = run(scenario())
    assert held and second is None and after == 0


def test_a_response_whose_body_never_started_gives_its_slot_back(store, run):
    """The client was gone before the first byte: sending the headers fails, the body generator
    never runs (so its own cleanup cannot), and the response releases the slot itself."""
    from starlette.requests import ClientDisconnect

    from service.api.streams import TimedStreamingResponse
    from service.api.streams import leased as _leased

    slots = OwnerSlots(store.r, limit=1)

    async def chunks():
        yield b"never sent"

    async def scenario() -> int:
        lease = await slots.acquire("alice")
        response = TimedStreamingResponse(_leased(chunks(), lease), lease=lease, send_timeout=5)

        async def send(message):
            raise OSError("connection reset")

        async def receive():
            await asyncio.sleep(3600)

        with pytest.raises(ClientDisconnect):
            await asyncio.wait_for(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send), 10)
        return await slots.held("alice")

    assert run(scenario()) == 0
