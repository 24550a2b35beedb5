"""The denoising engine: iteration-level ("continuous") batching of denoising steps.

LLM servers batch the *tokens* of many requests one decoding step at a time; this engine does
the same with *denoising steps*. It owns a pool of requests (a request is a group of images, e.g.
one shard of a job) and advances them together:

    engine = DenoisingEngine(model, EngineConfig(max_batch=256))
    engine.add(Request(id="job1/0", owner="alice", seed=7, start=0, count=16, steps=50, labels=[3] * 16))
    while not engine.idle:
        for done in engine.step():        # one network call for every selected row
            done.pixels()                 # [count, H, W, C] uint8 (waits for the device copy)

One `step()`:
  1. schedules: picks the requests that run this step (see `_select`): fair across owners,
     shortest remaining work first, within `max_batch` rows (guidance twins count at the steps
     where they run), and only as many as keep the step fast for the shortest request where
     the measured step-time table says joining is expensive (a CPU), while merging freely
     where it is cheap (a GPU);
  2. assembles the batch only when the selection changed (requests joined, finished, were
     canceled or paused): per-row x, timestep-table offsets and positions, labels, guidance;
  3. runs the network once: rows at different timesteps in one call (the UNet takes a timestep
     per row), plus a null-class twin for each row whose guidance scale is not 1 and whose
     timestep is inside the model's guidance interval (outside it the twin would go unused);
  4. applies each sampler's per-row `step()` to its rows (one call per distinct sampler in the
     batch, never per row), with per-row noise draws from (seed, index, step);
  5. hands back requests whose rows all finished: uint8 on the device, copied to pinned host
     memory without waiting (`Finished.pixels()` waits for that copy, off the stepping thread);
     and, for a request that asked for previews (`Request.preview_every`), every k-th step's
     x0 prediction of its first image, copied the same way (`take_previews()`).

Nothing in a step reads a device tensor back to the host: positions are mirrored on the host
(every selected row advances by exactly one step), and a batch rebuilt after a change of
membership reaches the device through pinned memory with asynchronous copies, so the loop
never waits on the GPU. A row's
trajectory depends only on its (seed, index, sampler, steps, label, guidance): the same as
`Sampler.sample` for the same image, whatever its batch neighbours or arrival time.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from undiffuse.checkpoint import DiffusionModel
from undiffuse.noise import ImageNoise
from undiffuse.registry import make_sampler
from undiffuse.samplers import NO_HISTORY, NULL_CLASS, Sampler, guided_timesteps, previous_timesteps

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Request:
    """Images [start, start + count) of one job: image i uses noise (seed, start + i).

    labels: one class per image for a conditional model (None for an unconditional one);
    options: the sampler's options (undiffuse.registry), e.g. {"eta": 0.0} for DDIM.
    preview_every: every this many steps (and never at the last), the sampler's x0 prediction
    of the request's first image is handed back as a `Preview` (None: no previews).
    """

    id: Hashable
    owner: str
    seed: int
    start: int
    count: int
    steps: int
    sampler: str = "ddim"
    options: dict[str, Any] = field(default_factory=dict)
    labels: Sequence[int] | None = None
    guidance_scale: float = 1.0
    preview_every: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """max_batch: rows per network call (guidance twins included); the service sets it from a
    setting and the free GPU memory (`max_batch_for_memory`).
    precision: network precision; None picks bf16 on CUDA (fp16 where bf16 is unsupported) and
    fp32 on a CPU. The sampler arithmetic always runs in fp32.
    compile: torch.compile the network, padding each call to the next bucket size so that
    steady state never recompiles; compile_mode "default" (max-autotune compiles for minutes per bucket) or
    "reduce-overhead" (CUDA graphs). None compiles on CUDA only.
    latency_slack: a request may join a step only if the step stays within this factor of the
    shortest request's own step time (from the warm-up table), unless its remaining work is
    within merge_ratio of that request's. None disables the check (always merge).
    """

    max_batch: int = 256
    precision: Precision | None = None
    channels_last: bool = True
    compile: bool | None = None
    compile_mode: str = "default"
    buckets: tuple[int, ...] | None = None
    latency_slack: float | None = 1.25
    merge_ratio: float = 2.0
    keep_samples: bool = False  # also hand back the float samples (Finished.samples): tests, benchmarks

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.precision is not None and self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {self.precision!r}")
        if self.latency_slack is not None and self.latency_slack < 1:
            raise ValueError(f"latency_slack must be >= 1, got {self.latency_slack}")


class Finished:
    """A request whose rows all finished. `pixels()` -> [count, H, W, C] uint8 numpy array."""

    def __init__(
        self, request: Request, host: Tensor, ready: torch.cuda.Event | None, samples: Tensor | None = None
    ) -> None:
        self.request = request
        self._host = host
        self._ready = ready
        self.samples = samples  # [count, C, H, W] float32 x_0, with EngineConfig.keep_samples

    @property
    def id(self) -> Hashable:
        return self.request.id

    def pixels(self):
        if self._ready is not None:
            self._ready.synchronize()  # the async device-to-host copy, not the whole device
        return self._host.numpy()


class Preview:
    """The x0 prediction of a request's first image after `step` of its steps, for a progress
    preview. `pixels()` -> [H, W, C] uint8 numpy array (waits for the device copy)."""

    def __init__(self, request: Request, step: int, host: Tensor, ready: torch.cuda.Event | None) -> None:
        self.request = request
        self.step = step
        self._host = host
        self._ready = ready

    @property
    def id(self) -> Hashable:
        return self.request.id

    def pixels(self):
        if self._ready is not None:
            self._ready.synchronize()
        return self._host[0].numpy()


class _Slot:
    """Engine state of one request: its rows' x while paused, its position, its sampler."""

    __slots__ = ("request", "sampler", "ts_offset", "twin_at", "pos", "x", "history", "order", "waited")

    def __init__(
        self, request: Request, sampler: Sampler, ts_offset: int, order: int, twin_at: Sequence[bool] = ()
    ) -> None:
        self.request = request
        self.sampler = sampler
        self.ts_offset = ts_offset  # where its timestep list starts in the engine's table
        self.twin_at = twin_at  # per step, whether its rows need null-class twins (empty: never)
        self.pos = 0  # steps done; every row of the request advances together
        self.x: Tensor | None = None  # [count, C, H, W] when not in the batch (None before start)
        self.history: Tensor | None = None  # a multistep sampler's previous x_0, like x (None before step 2)
        self.order = order  # arrival order (ties)
        self.waited = 0  # steps it was passed over since it arrived (ageing: nothing starves)

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
        return self.pos < len(self.twin_at) and self.twin_at[self.pos]

    @property
    def rows(self) -> int:
        """Rows it takes in this step's network call: its images plus their null-class twins."""
        return self.request.count * (2 if self.twins else 1)

    @property
    def peak_rows(self) -> int:
        """The most rows it takes at any step still to come."""
        return self.request.count * (2 if any(self.twin_at[self.pos :]) else 1)


@dataclass
class _Batch:
    """The assembled batch: valid until the selection changes."""

    slots: list[_Slot]
    x: Tensor  # [B, C, H, W] float32
    history: Tensor | None  # [B, C, H, W] float32: previous x_0 of every row, when a multistep sampler runs
    rows: Tensor  # [B] long: offset of each row's timestep list + its position
    starts: Tensor  # [B] long: offset of each row's timestep list (rows - starts = steps done)
    labels: Tensor | None  # [B] long
    guided: list[tuple[_Slot, int, int]]  # (slot, begin, end) of each request with guidance != 1
    twin_key: tuple[int, ...] | None  # which of `guided` have their twins in `twins` (None: not built yet)
    twins: Tensor | None  # [G] long: rows whose null-class twin runs this step
    scales: Tensor | None  # [G, 1, 1, 1] float32: their guidance scales
    groups: list[tuple[Sampler, Tensor | None, ImageNoise]]  # (sampler, its rows or None for all, their noise)
    bounds: list[tuple[int, int]]  # each slot's [begin, end) rows in x
    previews: list[tuple[_Slot, int, int]]  # (slot, its group, its first row within the group) where previews are due


class DenoisingEngine:
    """Runs requests of one model with step-level continuous batching (see the module docs)."""

    def __init__(self, model: DiffusionModel, config: EngineConfig | None = None) -> None:
        self.model = model
        self.config = cfg = config or EngineConfig()
        self.device = model_device(model)
        cuda = self.device.type == "cuda"
        self.dtype = _DTYPES[cfg.precision or _default_precision(self.device)]
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        self.network: Callable[..., Tensor] = model.network
        self.compiled = cfg.compile if cfg.compile is not None else cuda
        if self.compiled:
            self.network = torch.compile(model.network, mode=cfg.compile_mode, dynamic=False)
        self.buckets = _buckets(cfg.max_batch, cfg.buckets)
        if self.compiled:
            _allow_recompiles(len(self.buckets))
        self.step_time: dict[int, float] = {}  # bucket -> seconds, from warm_up()
        # per timestep, whether guidance acts (the model's interval; None: at every one), on the host
        interval = model.guidance_interval
        self._guided_t = None if interval is None else guided_timesteps(model.schedule, interval).tolist()
        self._samplers: dict[tuple, Sampler] = {}
        self._ts_table = torch.empty(0, dtype=torch.long, device=self.device)
        self._ts_host: list[int] = []  # the same table on the host: which steps need twins
        self._ts_offsets: dict[tuple, int] = {}
        self._slots: dict[Hashable, _Slot] = {}
        self._owners: deque[str] = deque()  # round-robin order of owners with work
        self._arrivals = itertools.count()
        self._canceled: set[Hashable] = set()
        self._batch: _Batch | None = None
        self._previews: list[Preview] = []
        self._timings: deque[tuple[Any, Any, int, str]] = deque(maxlen=100_000)  # (start, end, rows, sampler)
        self._network_rows = 0  # rows of the last network call, guidance twins included

    # --- the public surface ----------------------------------------------------------------------
    @property
    def idle(self) -> bool:
        return not self._slots

    def __len__(self) -> int:
        """Requests queued or running."""
        return len(self._slots)

    def add(self, request: Request) -> None:
        """Queue a request; it joins the batch at a coming step."""
        if request.id in self._slots:
            raise ValueError(f"request {request.id!r} is already in the engine")
        self._validate(request)
        key = (request.sampler, tuple(sorted(request.options.items())))
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = make_sampler(request.sampler, self.model.schedule, **request.options)
        offset = self._timesteps(key, sampler, request.steps)
        twin_at: tuple[bool, ...] = ()
        if request.guidance_scale != 1.0:
            ts = self._ts_host[offset : offset + request.steps]
            twin_at = tuple(self._guided_t is None or self._guided_t[t] for t in ts)
        slot = _Slot(request, sampler, offset, next(self._arrivals), twin_at)
        if slot.peak_rows > self.config.max_batch:
            raise ValueError(
                f"request {request.id!r} needs {slot.peak_rows} rows (guidance twins count); "
                f"max_batch is {self.config.max_batch}"
            )
        self._slots[request.id] = slot
        if request.owner not in self._owners:
            self._owners.append(request.owner)

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a request: its rows leave the batch at the next step. False if unknown."""
        if request_id not in self._slots:
            return False
        self._canceled.add(request_id)
        return True

    def set_max_batch(self, max_batch: int) -> None:
        """Change the rows per network call (the service's user_config); never below the rows of
        a request already queued. New buckets compile on first use (warm_up compiles them), and
        the step-time table is kept for the buckets that stay."""
        largest = max((slot.peak_rows for slot in self._slots.values()), default=1)
        max_batch = max(max_batch, largest)  # a request already queued must still fit
        self.config = replace(self.config, max_batch=max_batch)
        self.buckets = _buckets(max_batch, self.config.buckets)
        if self.compiled:
            _allow_recompiles(len(self.buckets))

    def take_previews(self) -> list[Preview]:
        """The previews made since the last call, oldest first (Request.preview_every)."""
        out, self._previews = self._previews, []
        return out

    def progress(self) -> dict[Hashable, int]:
        """Steps done by each queued or running request."""
        return {rid: s.pos for rid, s in self._slots.items()}

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Advance the selected requests by one denoising step; return those that finished."""
        self._drop_canceled()
        if not self._slots:
            return []
        selected = self._select()
        started = self._mark()
        batch = self._batch
        if batch is None or [s.request.id for s in batch.slots] != [s.request.id for s in selected]:
            batch = self._assemble(selected)
        # 1. one network call for every row, at its own timestep, plus guidance twins
        t = self._ts_table[batch.rows]
        eps = self._eps(batch, t)
        # 2. each sampler's per-row update on its rows (one call per sampler, not per row)
        t_prev = self._ts_table[batch.rows + 1]
        x = batch.x
        x0s: list[Tensor] | None = [] if batch.previews else None  # each group's x0 prediction
        for sampler, rows, noise in batch.groups:
            if rows is None:
                xs, es, ts, tp, done = x, eps, t, t_prev, batch.rows - batch.starts
            else:
                xs, es, ts, tp, done = x[rows], eps[rows], t[rows], t_prev[rows], (batch.rows - batch.starts)[rows]
            # step k uses noise draw k + 1, as Sampler.sample does
            z = noise.draw_rows(done + 1, self.model.image_shape) if sampler.needs_noise else None
            if sampler.multistep:  # its rows' previous x_0 and timestep (none on their first step)
                hs = batch.history if rows is None else batch.history[rows]
                here = batch.rows if rows is None else batch.rows[rows]
                t_last = torch.where(done > 0, self._ts_table[(here - 1).clamp(min=0)], NO_HISTORY)
                out = sampler.step(es, ts, xs, z, t_prev=tp, t_last=t_last, history=hs)
                new = out.pred_x0
                batch.history = new if rows is None else batch.history.index_copy(0, rows, new)
            else:
                out = sampler.step(es, ts, xs, z, t_prev=tp)
            x = out.prev_sample if rows is None else x.index_copy(0, rows, out.prev_sample)
            if x0s is not None:
                x0s.append(out.pred_x0)
        batch.x = x
        batch.rows = batch.rows + 1
        ran = {id(slot) for slot in selected}
        for slot in self._slots.values():
            if id(slot) in ran:
                slot.pos += 1
            else:
                slot.waited += 1
        if x0s is not None:
            self._capture_previews(batch, x0s)
        names = {s.request.sampler for s in selected}
        self._timings.append((started, self._mark(), self._network_rows, names.pop() if len(names) == 1 else "mixed"))
        return self._collect_finished(batch)

    def step_times(self) -> list[tuple[float, int, str]]:
        """(seconds, rows, sampler) of each step whose timing is known by now, oldest first (rows:
        the network call's, guidance twins included: what the step cost);
        "mixed" when a step ran rows of several samplers. On CUDA a step is timed by events
        around it and read only once the device has passed them, so timing never waits on the
        device; on a CPU it is wall time."""
        out = []
        while self._timings:
            start, end, images, sampler = self._timings[0]
            if isinstance(end, float):
                seconds = end - start
            elif end.query():
                seconds = start.elapsed_time(end) / 1e3
            else:
                break
            self._timings.popleft()
            out.append((seconds, images, sampler))
        return out

    def _mark(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _capture_previews(self, batch: _Batch, x0s: list[Tensor]) -> None:
        """3. a preview of each previewing request whose step count just reached a multiple of
        its preview_every (not its last step: that is the image itself)."""
        for slot, group, row in batch.previews:
            every, steps = slot.request.preview_every, slot.request.steps
            if slot.pos % every == 0 and slot.pos < steps:
                host, ready = self._pixels_to_host(x0s[group][row : row + 1])
                self._previews.append(Preview(slot.request, slot.pos, host, ready))

    # --- scheduling --------------------------------------------------------------------------------
    def _select(self) -> list[_Slot]:
        """The requests that run this step, in arrival order.

        The head is the request with the least remaining work less the steps it has waited since
        it arrived: a long request passed over by a stream of short ones moves up one place per
        step and, once at the front, stays there, so every wait is bounded. The rest are offered in round-robin turns across
        owners, starting after the head's owner, each owner's requests shortest first. One
        joins if its rows fit in max_batch and the step would take at most latency_slack times
        as long as the short ones alone (those within merge_ratio of the shortest remaining
        work): merging is free where the measured step time is flat (a GPU below saturation)
        and refused where it would slow the shortest request down (a CPU).
        """
        cfg = self.config
        head, offered, self._owners = self._offer_order()
        chosen, rows = [head], head.rows
        # the latency check, kept incrementally (a pass over `chosen` only when the shortest
        # remaining work drops, not one per candidate as the rule reads)
        check = cfg.latency_slack is not None and bool(self.step_time)
        ratio = cfg.merge_ratio
        shortest = head.remaining
        short_rows = head.rows if head.remaining <= ratio * shortest else 0
        for slot in offered:
            if rows + slot.rows > cfg.max_batch:
                continue
            if check:
                low = min(shortest, slot.remaining)
                short = short_rows if low == shortest else sum(s.rows for s in chosen if s.remaining <= ratio * low)
                short += slot.rows if slot.remaining <= ratio * low else 0
                if not self._cheap_to_join(rows + slot.rows, short):
                    continue
                shortest, short_rows = low, short
            chosen.append(slot)
            rows += slot.rows
        return sorted(chosen, key=lambda s: s.order)

    def _offer_order(self) -> tuple[_Slot, list[_Slot], deque[str]]:
        """(the head, the other requests in the order they are offered, the owners' order for the
        next step): the scheduling order of `_select`, without the fit and latency checks."""
        by_owner: dict[str, list[_Slot]] = {}
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
        # every step the fill starts one owner further round (and the head's owner goes last)
        rest = owners[turn:] + owners[: turn - 1]
        return head, offered, deque([*rest[1:], *rest[:1], head_owner])

    def _cheap_to_join(self, rows: int, short_rows: int) -> bool:
        """Whether a step over `rows` stays within latency_slack of the time the `short_rows` (the
        rows of the requests within merge_ratio of the least remaining work among them) would take
        alone, by the measured step-time table."""
        return self._cost(rows) <= self.config.latency_slack * self._cost(short_rows)

    def _cost(self, rows: int) -> float:
        """Seconds per step for a batch of rows, from the warm-up table; a bucket warm-up did not
        reach is extrapolated linearly from the largest measured one (never free)."""
        bucket = self._bucket(rows)
        if bucket in self.step_time:
            return self.step_time[bucket]
        largest = max(self.step_time)
        return self.step_time[largest] * max(1.0, bucket / largest)

    def _bucket(self, rows: int) -> int:
        for b in self.buckets:
            if rows <= b:
                return b
        return rows

    # --- assembling a batch ------------------------------------------------------------------------
    def _assemble(self, selected: list[_Slot]) -> _Batch:
        """Write the old batch's rows back to their slots and build the new batch."""
        old = self._batch
        if old is not None:
            _write_back(old, [s for s in old.slots if s.request.id in self._slots])
        xs, histories, rows, starts, labels, seeds, indices = [], [], [], [], [], [], []
        bounds, begin = [], 0
        for slot in selected:
            r = slot.request
            if slot.x is None:  # first step: x_T is noise draw 0, as in Sampler.sample
                slot.x = ImageNoise([r.seed] * r.count, range(r.start, r.start + r.count), self.device).draw(
                    0, self.model.image_shape
                )
            xs.append(slot.x)
            histories.append(slot.history if slot.history is not None else torch.zeros_like(slot.x))
            rows += [slot.ts_offset + slot.pos] * r.count
            starts += [slot.ts_offset] * r.count
            labels += list(r.labels) if r.labels is not None else [NULL_CLASS] * r.count
            seeds += [r.seed] * r.count
            indices += range(r.start, r.start + r.count)
            bounds.append((begin, begin + r.count))
            begin += r.count
        dev = self.device
        as_long = lambda values: _host_to_device(torch.tensor(values, dtype=torch.long), dev)  # noqa: E731
        groups: dict[int, tuple[Sampler, list[int]]] = {}
        for slot, (lo, hi) in zip(selected, bounds, strict=True):
            groups.setdefault(id(slot.sampler), (slot.sampler, []))[1].extend(range(lo, hi))
        conditional = self.model.num_classes is not None
        noise = ImageNoise(seeds, indices, dev)
        group_rows = [(s, None if len(g) == begin else as_long(g)) for s, g in groups.values()]
        previews = []  # few: in the service only a job's first shard previews
        for slot, (lo, _hi) in zip(selected, bounds, strict=True):
            if slot.request.preview_every is not None:
                group = list(groups).index(id(slot.sampler))
                previews.append((slot, group, groups[id(slot.sampler)][1].index(lo)))
        batch = _Batch(
            slots=selected,
            x=torch.cat(xs),
            history=torch.cat(histories) if any(slot.sampler.multistep for slot in selected) else None,
            rows=as_long(rows),
            starts=as_long(starts),
            labels=as_long(labels) if conditional else None,
            guided=[
                (slot, lo, hi)
                for slot, (lo, hi) in zip(selected, bounds, strict=True)
                if conditional and slot.request.guidance_scale != 1.0
            ],
            twin_key=None,
            twins=None,
            scales=None,
            groups=[(s, g, noise if g is None else noise.select(g)) for s, g in group_rows],
            bounds=bounds,
            previews=previews,
        )
        for slot in selected:
            slot.x = slot.history = None  # the batch owns the rows now
        self._batch = batch
        return batch

    # --- the network ---------------------------------------------------------------------------------
    def _eps(self, batch: _Batch, t: Tensor) -> Tensor:
        """eps for every row, guided where the scale is not 1: [B, C, H, W] float32."""
        x, labels = batch.x, batch.labels
        twins = self._twins(batch)
        n = x.shape[0]
        if twins is not None:  # the null-class twins ride in the same call
            x_in = torch.cat([x, x[twins]])
            t_in = torch.cat([t, t[twins]])
            labels_in = torch.cat([labels, torch.full_like(twins, NULL_CLASS)])
        else:
            x_in, t_in, labels_in = x, t, labels
        self._network_rows = x_in.shape[0]
        out = self._forward(x_in, t_in, labels_in)
        if twins is None:
            return out
        eps, eps_u = out[:n], out[n:]
        eps_c = eps[twins]
        guided = eps_u + batch.scales * (eps_c - eps_u)  # Ho & Salimans 2022
        return eps.index_copy(0, twins, guided)

    def _twins(self, batch: _Batch) -> Tensor | None:
        """[G] long: the rows whose null-class twin runs this step, those of guided requests at a
        timestep inside the model's guidance interval (plain conditional steps outside it need
        none). Every row of a request is at the same step, so this is decided per request on the
        host; the index tensors are rebuilt only when the set changes (at the interval's edges)."""
        if not batch.guided:
            return None
        key = tuple(i for i, (slot, _, _) in enumerate(batch.guided) if slot.twins)
        if key != batch.twin_key:
            active = [batch.guided[i] for i in key]
            rows = [row for _, lo, hi in active for row in range(lo, hi)]
            scales = [slot.request.guidance_scale for slot, lo, hi in active for _ in range(lo, hi)]
            batch.twin_key = key
            batch.twins = _host_to_device(torch.tensor(rows, dtype=torch.long), self.device) if rows else None
            batch.scales = _host_to_device(torch.tensor(scales), self.device).view(-1, 1, 1, 1) if rows else None
        return batch.twins

    def _forward(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The network at the engine's precision, padded to a bucket when compiled; returns eps
        in float32 (v predictions converted in float32)."""
        n = x.shape[0]
        if self.compiled:
            pad = self._bucket(n) - n
            if pad:
                x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
                t = torch.cat([t, t.new_zeros(pad)])
                labels = None if labels is None else torch.cat([labels, labels.new_full((pad,), NULL_CLASS)])
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.network(x, t, labels)
        out = out[:n].float()
        return self.model.eps_from_output(x[:n].float(), t[:n], out)

    # --- results ---------------------------------------------------------------------------------------
    def _collect_finished(self, batch: _Batch) -> list[Finished]:
        done = [(slot, b) for slot, b in zip(batch.slots, batch.bounds, strict=True) if slot.remaining == 0]
        if not done:
            return []
        out = []
        for slot, (lo, hi) in done:
            out.append(self._to_host(slot.request, batch.x[lo:hi]))
            del self._slots[slot.request.id]
        self._batch = None  # membership changed; the next step reassembles (and writes back)
        _write_back(batch, [s for s in batch.slots if s.remaining > 0])
        return out

    def _to_host(self, request: Request, x: Tensor) -> Finished:
        samples = x.clone() if self.config.keep_samples else None
        return Finished(request, *self._pixels_to_host(x), samples)

    def _pixels_to_host(self, x: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        """[N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] on the device, then an async copy to
        pinned host memory; returns it with the event that marks the copy done (None on a CPU)."""
        pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
        if self.device.type != "cuda":
            return pixels.contiguous(), None
        host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(pixels, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return host, ready

    def _drop_canceled(self) -> None:
        if not self._canceled:
            return
        for rid in self._canceled:
            self._slots.pop(rid, None)
        if self._batch is not None and any(s.request.id in self._canceled for s in self._batch.slots):
            old, self._batch = self._batch, None
            _write_back(old, [s for s in old.slots if s.request.id in self._slots])
        self._canceled.clear()

    # --- set-up ------------------------------------------------------------------------------------------
    def _timesteps(self, key: tuple, sampler: Sampler, steps: int) -> int:
        """Offset of (sampler, steps)'s timestep list, followed by LAST, in the shared table."""
        full = (*key, steps)
        offset = self._ts_offsets.get(full)
        if offset is None:
            ts = sampler.timesteps(steps)
            values = [*ts, previous_timesteps(ts)[-1]]
            offset = self._ts_offsets[full] = self._ts_table.numel()
            self._ts_table = torch.cat(
                [self._ts_table, _host_to_device(torch.tensor(values, dtype=torch.long), self.device)]
            )
            self._ts_host += values
        return offset

    def _validate(self, request: Request) -> None:
        m = self.model
        if request.count < 1:
            raise ValueError(f"request {request.id!r}: count must be >= 1")
        if not (0 <= request.seed < 2**63 and 0 <= request.start and request.start + request.count <= 2**63):
            raise ValueError(f"request {request.id!r}: seed and image indices must lie in [0, 2**63)")
        if not 1 <= request.steps <= m.schedule.num_timesteps:
            raise ValueError(f"request {request.id!r}: steps must be in [1, {m.schedule.num_timesteps}]")
        if m.num_classes is None:
            if request.labels is not None or request.guidance_scale != 1.0:
                raise ValueError(f"request {request.id!r}: the model is unconditional (no labels or guidance)")
        elif request.labels is None or len(request.labels) != request.count:
            raise ValueError(f"request {request.id!r}: needs one class label per image")
        if request.preview_every is not None and request.preview_every < 1:
            raise ValueError(f"request {request.id!r}: preview_every must be >= 1")

    @torch.no_grad()
    def warm_up(self, max_seconds: float = 120.0, log: Callable[[str], None] | None = None) -> dict[int, float]:
        """Run every bucket once (compiling it when compiled) and time a second call of each,
        smallest first, until max_seconds have passed. Fills `step_time`, which the scheduler's
        latency check reads. Returns {bucket: seconds per step}."""
        started = time.perf_counter()
        c, h, w = self.model.image_shape
        for b in self.buckets:
            if time.perf_counter() - started > max_seconds:
                if log:
                    log(f"warm-up stopped at {max_seconds:.0f} s; buckets above {b // 2} stay cold")
                break
            x = torch.randn(b, c, h, w, device=self.device)
            t = torch.full((b,), self.model.schedule.num_timesteps // 2, device=self.device)
            labels = None if self.model.num_classes is None else torch.zeros(b, dtype=torch.long, device=self.device)
            self._forward(x, t, labels)  # compile / allocate
            _sync(self.device)
            t0 = time.perf_counter()
            self._forward(x, t, labels)
            _sync(self.device)
            self.step_time[b] = time.perf_counter() - t0
            if log:
                log(f"bucket {b}: {self.step_time[b] * 1e3:.1f} ms per step")
        return dict(self.step_time)


def _write_back(batch: _Batch, slots: list[_Slot]) -> None:
    """Give the batch's rows back to those of its slots that stay (the batch is being dropped)."""
    keep = {id(slot) for slot in slots}
    for slot, (lo, hi) in zip(batch.slots, batch.bounds, strict=True):
        if id(slot) in keep:
            slot.x = batch.x[lo:hi]
            slot.history = batch.history[lo:hi] if batch.history is not None and slot.sampler.multistep else None


def _host_to_device(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device without waiting for it: pinned memory, asynchronous copy."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values


def _allow_recompiles(buckets: int) -> None:
    """torch.compile(dynamic=False) compiles once per batch bucket; dynamo stops recompiling
    after recompile_limit (8) shapes and runs the rest eager, so make room for every bucket."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), buckets + 8))


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights live (a CPU for a model without any)."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _default_precision(device: torch.device) -> Precision:
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def _buckets(max_batch: int, buckets: tuple[int, ...] | None) -> tuple[int, ...]:
    """Padded batch sizes: powers of two up to max_batch, and max_batch itself."""
    if buckets:
        out = sorted({b for b in buckets if 1 <= b <= max_batch} | {max_batch})
    else:
        out = sorted({2**k for k in range(int(math.log2(max_batch)) + 1)} | {max_batch})
    return tuple(out)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_batch_for_memory(
    model: DiffusionModel,
    setting: int,
    dtype: torch.dtype = torch.bfloat16,
    fraction: float = 0.8,
    probe_rows: int = 32,
) -> int:
    """The largest batch (rows per network call) that fits: min(setting, what `fraction` of the
    device memory not held by tensors takes at the activation memory per row, measured with a
    probe forward at the engine's precision). Memory the caching allocator holds but no tensor
    uses counts as free. On a CPU: the setting."""
    device = model_device(model)
    if device.type != "cuda":
        return setting
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    c, h, w = model.image_shape
    x = torch.randn(probe_rows, c, h, w, device=device)
    t = torch.zeros(probe_rows, dtype=torch.long, device=device)
    labels = None if model.num_classes is None else torch.zeros(probe_rows, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        model.network(x, t, labels)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe_rows)
    del x, t, labels
    free, _total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(1, min(setting, int(free * fraction // per_row)))
