"""Which requests run a denoising step: the engine's scheduling policy, on the host only.

`Scheduler` holds one `Slot` per queued or running request and decides, before every step,
which of them run it (`select`, the rule below). The engine asks `schedule()`, which returns
that selection but re-evaluates the rule only when its result can have changed:

- every priority moves by one per step (a running request's remaining work drops by one, a
  waiting one's wait grows by one), so the order of the requests never changes by itself;
- when every request runs, the fill order does not rotate, so the rule sees the same order;
- what remains is known in advance: a request finishing, its guidance twins switching on or
  off at the guidance interval's edges, or the latency check classing a request differently
  as the remaining work shrinks (`_stable_steps`).

So a step where nothing joined, finished, paused or was canceled costs O(1) host work whatever
the number of requests; positions and waits are kept relative to a step clock and settled only
when the selection is re-evaluated.

The rule (`select`): the head is the request with the least remaining work less the steps it
has waited since it arrived: a long request passed over by a stream of short ones moves up one
place per step and, once at the front, stays there, so every wait is bounded. The rest are
offered in round-robin turns across owners, starting after the head's owner, each owner's
requests shortest first. One joins if its rows fit in max_batch and the step would take at most
latency_slack times as long as the short ones alone (those within merge_ratio of the shortest
remaining work): merging is free where the measured step time is flat (a GPU below saturation)
and refused where it would slow the shortest request down (a CPU). The turn order moves one
owner round after a step that passed a request over, so owners take turns at a full batch.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any


class _Clock:
    """The number of steps run; shared by the scheduler and its slots."""

    __slots__ = ("now",)

    def __init__(self) -> None:
        self.now = 0


class Slot:
    """The scheduling state of one request: its position, its wait, the rows it takes.

    `pos` (steps done) and `waited` (steps passed over since it arrived) advance with the
    scheduler's clock while the request runs or waits, without per-step bookkeeping.
    """

    __slots__ = ("request", "twin_at", "order", "_clock", "_pos", "_waited", "_since", "_running", "_switches", "state")

    def __init__(self, request: Any, order: int, clock: _Clock, twin_at: Sequence[bool] = ()) -> None:
        self.request = request  # undiffuse.engine.Request (id, owner, count, steps ...)
        self.twin_at = tuple(twin_at)  # per step, whether its rows need null-class twins (empty: never)
        self.order = order  # arrival order (ties)
        self._clock = clock
        self._pos = 0
        self._waited = 0
        self._since = clock.now  # when it last started or stopped running
        self._running = False
        # the steps at which twin_at changes value: where its rows change
        self._switches = [k for k in range(1, len(self.twin_at)) if self.twin_at[k] != self.twin_at[k - 1]]
        self.state: Any = None  # the engine's per-request data (its rows while paused ...)

    @property
    def id(self) -> Hashable:
        return self.request.id

    @property
    def pos(self) -> int:
        """Steps done; every row of the request advances together."""
        return self._pos + (self._clock.now - self._since if self._running else 0)

    @property
    def waited(self) -> int:
        """Steps it was passed over since it arrived (ageing: nothing starves)."""
        return self._waited + (0 if self._running else self._clock.now - self._since)

    @property
    def running(self) -> bool:
        """Whether it was selected for the step now running (or last run)."""
        return self._running

    @property
    def priority(self) -> tuple[int, int]:
        """Lower runs first: remaining work less the steps waited, then arrival."""
        return (self.remaining - self.waited, self.order)

    @property
    def remaining(self) -> int:
        return self.request.steps - self.pos

    @property
    def twins(self) -> bool:
        """Whether its rows need null-class twins at this step (guided, inside the interval)."""
        pos = self.pos
        return pos < len(self.twin_at) and self.twin_at[pos]

    @property
    def rows(self) -> int:
        """Rows it takes in this step's network call: its images plus their null-class twins."""
        return self.request.count * (2 if self.twins else 1)

    @property
    def peak_rows(self) -> int:
        """The most rows it takes at any step still to come."""
        return self.request.count * (2 if any(self.twin_at[self.pos :]) else 1)

    def steps_to_twin_switch(self) -> int | None:
        """Steps until its twins switch on or off (None: never again)."""
        pos = self.pos
        k = bisect.bisect_right(self._switches, pos)
        return self._switches[k] - pos if k < len(self._switches) else None

    def _set_running(self, running: bool) -> None:
        if running == self._running:
            return
        now = self._clock.now
        if self._running:
            self._pos += now - self._since
        else:
            self._waited += now - self._since
        self._since, self._running = now, running


class Scheduler:
    """The requests of one engine and the rule that picks each step's batch (module docs).

    max_batch: rows per network call; latency_slack, merge_ratio: the latency check (None
    slack: always merge); step_time: {bucket rows: seconds per step} from the engine's warm-up;
    buckets: the padded batch sizes those rows round up to.
    """

    def __init__(
        self,
        max_batch: int,
        latency_slack: float | None = 1.25,
        merge_ratio: float = 2.0,
        buckets: Sequence[int] = (),
        step_time: Mapping[int, float] | None = None,
    ) -> None:
        self.max_batch = max_batch
        self.latency_slack = latency_slack
        self.merge_ratio = merge_ratio
        self.buckets = tuple(buckets)
        self._step_time: dict[int, float] = dict(step_time or {})
        self._clock = _Clock()
        self._slots: dict[Hashable, Slot] = {}
        self._owners: deque[str] = deque()  # round-robin order of owners with work
        self._arrivals = itertools.count()
        self._plan: list[Slot] | None = None  # the last selection, while it provably stands
        self._plan_until = 0  # the clock at which it must be re-evaluated

    # --- views ------------------------------------------------------------------------------------
    @property
    def clock(self) -> int:
        """Steps run since the scheduler was made."""
        return self._clock.now

    @property
    def step_time(self) -> dict[int, float]:
        """{bucket rows: seconds per step}: a copy; assign to change it."""
        return dict(self._step_time)

    @step_time.setter
    def step_time(self, table: Mapping[int, float]) -> None:
        self._step_time = dict(table)
        self.invalidate()

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, request_id: Hashable) -> bool:
        return request_id in self._slots

    def get(self, request_id: Hashable) -> Slot | None:
        return self._slots.get(request_id)

    @property
    def slots(self) -> tuple[Slot, ...]:
        """Every queued or running request's slot, in arrival order."""
        return tuple(self._slots.values())

    @property
    def owners(self) -> tuple[str, ...]:
        """The owners with work, in the order their turns come."""
        return tuple(o for o in self._owners if any(s.request.owner == o for s in self._slots.values()))

    # --- membership -------------------------------------------------------------------------------
    def add(self, request: Any, twin_at: Sequence[bool] = ()) -> Slot:
        if request.id in self._slots:
            raise ValueError(f"request {request.id!r} is already in the engine")
        slot = Slot(request, next(self._arrivals), self._clock, twin_at)
        self._slots[request.id] = slot
        if request.owner not in self._owners:
            self._owners.append(request.owner)
        self.invalidate()
        return slot

    def remove(self, request_id: Hashable) -> Slot | None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            slot._set_running(False)
            self.invalidate()
        return slot

    def set_max_batch(self, max_batch: int, buckets: Sequence[int]) -> None:
        self.max_batch, self.buckets = max_batch, tuple(buckets)
        self.invalidate()

    def invalidate(self) -> None:
        """Re-evaluate the rule at the next step (something it reads changed)."""
        self._plan = None

    # --- the rule ---------------------------------------------------------------------------------
    def offer_order(self) -> tuple[Slot, list[Slot]]:
        """(the head, the other requests in the order they are offered): the order `select`
        considers them in, before the fit and latency checks."""
        head, offered, _ = self._offer_order()
        return head, offered

    def _offer_order(self) -> tuple[Slot, list[Slot], list[str]]:
        by_owner: dict[str, list[Slot]] = {}
        for slot in self._slots.values():
            by_owner.setdefault(slot.request.owner, []).append(slot)
        for slots in by_owner.values():
            slots.sort(key=lambda s: s.priority)
        owners = [o for o in self._owners if o in by_owner]
        head_owner = min(owners, key=lambda o: by_owner[o][0].priority)
        head = by_owner[head_owner].pop(0)
        turn = owners.index(head_owner) + 1
        turns = itertools.zip_longest(*(by_owner[o] for o in owners[turn:] + owners[:turn]))
        offered = [s for group in turns for s in group if s is not None]
        return head, offered, owners

    def select(self) -> list[Slot]:
        """The requests that run this step, in arrival order (the rule of the module docs);
        changes nothing."""
        return self._select()[0]

    def _select(self) -> tuple[list[Slot], list[str]]:
        """(the selection, the owners' turn order for the step after)."""
        head, offered, owners = self._offer_order()
        chosen, rows = [head], head.rows
        # the latency check, kept incrementally (a pass over `chosen` only when the shortest
        # remaining work drops, not one per candidate as the rule reads)
        check = self._checks_latency()
        ratio = self.merge_ratio
        shortest = head.remaining
        short_rows = head.rows if head.remaining <= ratio * shortest else 0
        passed_over = False
        for slot in offered:
            if rows + slot.rows > self.max_batch:
                passed_over = True
                continue
            if check:
                low = min(shortest, slot.remaining)
                short = short_rows if low == shortest else sum(s.rows for s in chosen if s.remaining <= ratio * low)
                short += slot.rows if slot.remaining <= ratio * low else 0
                if not self.cheap_to_join(rows + slot.rows, short):
                    passed_over = True
                    continue
                shortest, short_rows = low, short
            chosen.append(slot)
            rows += slot.rows
        if passed_over:  # the next step's fill starts one owner further round (the head's goes last)
            head_owner = head.request.owner
            turn = owners.index(head_owner) + 1
            rest = owners[turn:] + owners[: turn - 1]
            owners = [*rest[1:], *rest[:1], head_owner]
        return sorted(chosen, key=lambda s: s.order), owners

    def _checks_latency(self) -> bool:
        return self.latency_slack is not None and bool(self._step_time)

    def cheap_to_join(self, rows: int, short_rows: int) -> bool:
        """Whether a step over `rows` stays within latency_slack of the time the `short_rows` (the
        rows of the requests within merge_ratio of the least remaining work among them) would take
        alone, by the measured step-time table."""
        return self.cost(rows) <= self.latency_slack * self.cost(short_rows)

    def cost(self, rows: int) -> float:
        """Seconds per step for a batch of rows, from the warm-up table; a bucket warm-up did not
        reach is extrapolated linearly from the largest measured one (never free)."""
        bucket = self.bucket(rows)
        if bucket in self._step_time:
            return self._step_time[bucket]
        largest = max(self._step_time)
        return self._step_time[largest] * max(1.0, bucket / largest)

    def bucket(self, rows: int) -> int:
        """The padded batch size `rows` round up to."""
        for b in self.buckets:
            if rows <= b:
                return b
        return rows

    # --- the engine's side ------------------------------------------------------------------------
    def schedule(self) -> tuple[list[Slot], bool]:
        """(this step's selection, whether it was re-evaluated): the rule's result, re-evaluated
        only when it can differ from the last step's. The caller runs the step, then `advance()`."""
        if self._plan is not None and self._clock.now < self._plan_until:
            return self._plan, False
        if not self._slots:
            return [], True
        chosen, owners = self._select()
        self._owners = deque(owners)
        ran = {id(s) for s in chosen}
        for slot in self._slots.values():
            slot._set_running(id(slot) in ran)
        if len(chosen) == len(self._slots):  # nobody waits: the same order until an input changes
            self._plan, self._plan_until = chosen, self._clock.now + self._stable_steps(chosen)
        else:
            self._plan = None
        return chosen, True

    def advance(self) -> None:
        """The selected requests ran one step."""
        self._clock.now += 1

    def _stable_steps(self, chosen: Iterable[Slot]) -> int:
        """Steps for which the rule's inputs stay as they are, when every request runs: up to a
        twin switch (rows change), or until the latency check would class some request against
        some other's remaining work differently (remaining work drops by one per step for all,
        so `r <= ratio * low` flips only where ratio != 1). Finishes invalidate the plan."""
        chosen = list(chosen)
        steps = min(s.remaining for s in chosen)
        for slot in chosen:
            switch = slot.steps_to_twin_switch()
            if switch is not None:
                steps = min(steps, switch)
        ratio = self.merge_ratio
        if self._checks_latency() and ratio != 1 and len(chosen) > 1:
            rem = sorted({s.remaining for s in chosen})
            for low in rem:
                limit = ratio * low
                if ratio > 1:  # r <= limit flips once k (ratio - 1) > limit - r, for the largest such r
                    i = bisect.bisect_right(rem, limit) - 1
                    if i >= 0:
                        steps = min(steps, max(1, math.floor((limit - rem[i]) / (ratio - 1))))
                else:  # r > limit flips once k (1 - ratio) >= r - limit, for the smallest such r
                    i = bisect.bisect_right(rem, limit)
                    if i < len(rem):
                        steps = min(steps, max(1, math.floor((rem[i] - limit) / (1 - ratio))))
        return max(1, steps)
