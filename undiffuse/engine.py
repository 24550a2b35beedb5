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
  1. schedules (`undiffuse.scheduler.Scheduler`): picks the requests that run this step: fair
     across owners, shortest remaining work first, within `max_batch` rows (guidance twins
     count at the steps where they run), and only as many as keep the step fast for the
     shortest request where the measured step-time table says joining is expensive (a CPU),
     while merging freely where it is cheap (a GPU). The rule is re-evaluated only when its
     result can change (a join, finish, cancel, pause, a twin switching, a latency class
     changing); in between a step costs O(1) host work whatever the number of requests;
  2. assembles the batch only when the selection changed, in a fixed number of tensor ops: the
     staying rows, the paused requests' rows and one batched x_T draw for every row that starts
     are gathered into one tensor, grouped by sampler; per-row timestep offsets, labels and
     noise keys are built on the host and copied once each;
  3. runs the network once: rows at different timesteps in one call (the UNet takes a timestep
     per row), plus a null-class twin for each row whose guidance scale is not 1 and whose
     timestep is inside the model's guidance interval (outside it the twin would go unused);
  4. steps every row in one `update` call (`undiffuse.samplers`), whatever its sampler: each
     row's coefficients are gathered from tables built when a (sampler, steps) pair is first
     seen, and the rows whose sampler draws noise get their own draws from (seed, index, step);
     where the engine compiles, `update` is one fused kernel;
  5. hands back requests whose rows all finished: their rows leave in one gather, converted to
     uint8 on the device and copied to pinned host memory without waiting (`Finished.pixels()`
     waits for that copy, off the stepping thread); and, for a request that asked for previews
     (`Request.preview_every`), every k-th step's x0 prediction of its first image, copied the
     same way (`take_previews()`).

A latent model (`DiffusionModel.is_latent`) denoises latents: the rows, the noise and the
samplers' arithmetic are the latents', and the requests that finish at a step are decoded to
images in one batched decoder call per `max_decode_batch` rows (padded to a bucket when
compiled, like the network); their previews are the decoded x0 prediction, at most every
`preview_decode_every` steps. Each chunk is converted to uint8 as soon as it is decoded, so
a decode holds the float images of one chunk at a time however many rows finish at a step. On
CUDA the decode chunk is sized once from the free device memory and the decoder's measured
peak for one image (`decode_batch_for_memory`); a chunk that runs out of memory is retried at
half its size, which the engine keeps (`decode_reserved_bytes`, the memory the decoder takes
at its chunk, is what the engine loop leaves out when it sizes the networks). Finished rows
leave through a side stream of the engine's own (`_SideStream`): it waits for the step that
made them, then decodes, converts to uint8 and copies to pinned host memory, while the next
steps are queued on the main stream without waiting for the decode; `Finished.pixels()` and
`Preview.pixels()` wait for an event recorded on the side stream. A pixel model's finished
rows take the same way (one conversion and one copy). On a CPU everything runs inline.

On CUDA, where the engine compiles, steps 3.-4. (and the noise draw) are recorded once per
bucket as one CUDA graph over static row buffers and replayed with a single launch
(`undiffuse.step_graph`, EngineConfig.step_graphs): a batch is copied into its graph's buffers
when the selection changes, and rows that leave are copied out before the next replay.

Nothing in a step reads a device tensor back to the host: positions are mirrored on the host
(every selected row advances by exactly one step), and a batch rebuilt after a change of
membership reaches the device through pinned memory with asynchronous copies, so the loop
never waits on the GPU. A row's
trajectory depends only on its (seed, index, sampler, steps, label, guidance): the same as
`Sampler.sample` for the same image, whatever its batch neighbours or arrival time.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor

from undiffuse.checkpoint import DiffusionModel
from undiffuse.compiled import allow_recompiles
from undiffuse.invariance import in_slices, pad_rows
from undiffuse.noise import ImageNoise, compiled_normals, normals
from undiffuse.samplers import (
    COLUMNS,
    NULL_CLASS,
    Sampler,
    batch_terms,
    compiled_update,
    guided_timesteps,
    previous_timesteps,
    update,
)
from undiffuse.scheduler import Scheduler, Slot
from undiffuse.step_graph import GraphKey, StepGraph

Precision = Literal["fp32", "bf16", "fp16"]
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_DECODE_BATCH = 16  # max_decode_batch=None on a CPU
DECODE_BATCH_CAP = 64  # the most rows per decoder call when sized by memory
DECODE_MEMORY_FRACTION = 0.5  # of the free device memory, for one decoder call
TABLE_CAPACITY = 4096  # timestep-table entries allocated at first (a 50-step pair takes 51)

log = logging.getLogger(__name__)


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
    max_decode_batch: a latent model's finished rows are decoded this many per decoder call
    (the decoder's activations at image size dwarf the denoiser's at latent size); None sizes
    it on CUDA once, at warm-up or the first decode, from the free device memory and the
    decoder's measured peak memory for one image (`decode_batch_for_memory`), and means
    CPU_DECODE_BATCH (16) on a CPU. Either way a decoder call that runs out of device memory
    halves it (`DenoisingEngine.decode_batch` says what it is now).
    preview_decode_every: a latent model's previews are made at most every this many steps
    (each decodes one image, about as costly as several denoising steps of it).
    The decoder runs at the network's precision, except fp16, where it runs in fp32 (VAE
    decoders overflow in fp16), and is compiled without CUDA graphs ("reduce-overhead" compiles
    it as "default"): it runs on a side stream beside the steps, and torch.compile's CUDA graphs
    share one memory pool whose reuse is safe only for graphs replayed on one stream.
    invariant_rows: the network runs on slices of exactly this many rows (the last padded), so
    that a row's result does not depend on its batch (undiffuse.invariance); a latent decoder
    then decodes one image per call, whatever max_decode_batch says, as DiffusionModel.decode
    does. 0: whole batches (padded to a bucket when compiled). None: the model's own setting
    (DiffusionModel.rows_for: 16 on a CPU, 0 on a GPU).
    step_graphs: run each step of a batch as one recorded CUDA graph per bucket (network, sampler
    update, noise draw and guidance twins; undiffuse.step_graph), replayed with one launch; the
    network is then compiled without torch.compile's own CUDA graphs. Batch-invariant slices run
    launch by launch (a call per slice), and so do the steps of a graph whose recording failed
    (logged). None: on where the engine compiles on CUDA with whole batches. On a CPU, True runs
    the same static-buffer step without recording it. A graph's network call is padded to the
    bucket, as a compiled launched call is (an uncompiled one is not: with compile off, rows
    may then differ from launched steps by the network's batch-size round-off).
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
    max_decode_batch: int | None = None
    preview_decode_every: int = 5
    invariant_rows: int | None = None
    step_graphs: bool | None = None

    def __post_init__(self) -> None:
        if self.invariant_rows is not None and self.invariant_rows < 0:
            raise ValueError(f"invariant_rows must be >= 0, got {self.invariant_rows}")
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.precision is not None and self.precision not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {self.precision!r}")
        if self.latency_slack is not None and self.latency_slack < 1:
            raise ValueError(f"latency_slack must be >= 1, got {self.latency_slack}")
        if self.max_decode_batch is not None and self.max_decode_batch < 1:
            raise ValueError(f"max_decode_batch must be >= 1 (or None: sized by memory), got {self.max_decode_batch}")
        if self.preview_decode_every < 1:
            raise ValueError(f"preview_decode_every must be >= 1, got {self.preview_decode_every}")


class Finished:
    """A request whose rows all finished. `pixels()` -> [count, H, W, C] uint8 numpy array.

    The rows of every request that finished at one step share one host tensor (one gather,
    one copy); each `Finished` reads its own rows of it."""

    def __init__(
        self,
        request: Request,
        host: Tensor,
        rows: tuple[int, int],
        ready: torch.cuda.Event | None,
        samples: Tensor | None = None,
    ) -> None:
        self.request = request
        self._host = host
        self._rows = rows
        self._ready = ready
        self._samples = samples

    @property
    def id(self) -> Hashable:
        return self.request.id

    @property
    def samples(self) -> Tensor | None:
        """[count, C, H, W] float32 x_0 (a latent model's decoded images), with
        EngineConfig.keep_samples (else None)."""
        lo, hi = self._rows
        return None if self._samples is None else self._samples[lo:hi]

    def pixels(self):
        if self._ready is not None:
            self._ready.synchronize()  # the async device-to-host copy, not the whole device
        lo, hi = self._rows
        return self._host[lo:hi].numpy()


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


class _Rows:
    """The engine's data of one request (`Slot.state`): its sampler, where its timesteps start,
    and, while it is paused, where its rows wait."""

    __slots__ = ("sampler", "ts_offset", "x", "history")

    def __init__(self, sampler: Sampler, ts_offset: int) -> None:
        self.sampler = sampler
        self.ts_offset = ts_offset  # where its timestep list starts in the engine's table
        self.x: tuple[Tensor, int] | None = None  # (tensor, first row) of its x while paused; None before start
        self.history: tuple[Tensor, int] | None = None  # the same for a multistep sampler's previous x_0


@dataclass
class _Batch:
    """The rows of the running requests: valid until the selection changes. Requests are
    grouped by sampler (so the rows that draw noise are few ranges), and every row steps through
    one `update` with its own coefficients, whatever its sampler."""

    slots: list[Slot]
    bounds: list[tuple[int, int]]  # each slot's [begin, end) rows in x
    x: Tensor  # [B, C, H, W] float32
    rows: Tensor  # [B] long: offset of each row's timestep list + its position
    starts: Tensor  # [B] long: offset of each row's timestep list (rows - starts = steps done)
    labels: Tensor | None  # [B] long
    terms: frozenset[str]  # the terms of `update` that any of its samplers uses
    noise: ImageNoise | None  # the noise keys of the rows whose sampler draws noise, in row order
    noise_rows: Tensor | None  # [M] long: those rows; None when every row draws noise
    history: Tensor | None  # [B, C, H, W]: each row's previous x_0 (when a multistep sampler runs)
    guided: list[tuple[Slot, int, int]]  # (slot, begin, end) of each request with guidance != 1
    twin_key: tuple[int, ...] | None = None  # which of `guided` have their twins in `twins`
    twins: Tensor | None = None  # [G] long: rows whose null-class twin runs this step
    scales: Tensor | None = None  # [G, 1, 1, 1] float32: their guidance scales
    twin_rows: list[int] = field(default_factory=list)  # `twins` on the host
    twin_scales: list[float] = field(default_factory=list)  # `scales` on the host
    previews: list[tuple[Slot, int]] = field(default_factory=list)  # (slot, its first row)
    sampler_name: str = ""  # the samplers' name, "mixed" when several
    finish_at: int = 0  # the scheduler clock at which its first request finishes
    graph: StepGraph | None = None  # where its rows live while its steps replay a step graph
    loaded_twins: tuple[int, ...] | None = None  # the twin_key its graph's guidance buffers hold


class _SideStream:
    """The CUDA stream where finished rows are decoded and copied to the host (one per engine),
    so that the steps queued on the main stream go on while images decode. On a CPU there is
    none and everything runs inline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @contextmanager
    def after(self, *inputs: Tensor) -> Iterator[None]:
        """Run the block on the side stream, after the work queued so far on the current stream
        (the step that made `inputs`). The inputs are recorded as used on the side stream, so
        that the caching allocator does not hand their memory to the main stream's next steps
        before the side stream is done with them."""
        if self.stream is None:
            yield
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        for tensor in inputs:
            tensor.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            yield

    def join(self, tensor: Tensor) -> Tensor:
        """A tensor made on the side stream, made safe to use from the current stream: that
        stream waits for the side stream's work so far, and the tensor is recorded as used on
        it. For EngineConfig.keep_samples only: it makes the next steps wait for the decode."""
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            tensor.record_stream(current)
        return tensor


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
        # rows per network call (0: whole batches); decodes then in fixed slices, one image unless set
        self.invariant_rows = cfg.invariant_rows if cfg.invariant_rows is not None else model.rows_for(self.device)
        # sliced calls are launched one by one: step graphs by default only where they can run
        auto_graphs = cuda and self.compiled and not self.invariant_rows
        self.step_graphs = cfg.step_graphs if cfg.step_graphs is not None else auto_graphs
        if self.compiled:
            mode = _without_cuda_graphs(cfg.compile_mode) if self.step_graphs else cfg.compile_mode
            self.network = torch.compile(model.network, mode=mode, dynamic=False)
        # the step graphs (step_graphs): one per GraphKey, sharing one memory pool
        self._graphs: dict[GraphKey, StepGraph] = {}
        self._unrecordable: set[GraphKey] = set()  # keys whose recording failed: launched op by op
        self._graph_pool = torch.cuda.graph_pool_handle() if cuda and self.step_graphs else None
        # every row's sampler step: fused into one kernel where the engine compiles
        self._update = compiled_update() if self.compiled else update
        self.buckets = _buckets(cfg.max_batch, cfg.buckets)
        # a latent model's decoder: its own call, bucketed to its own sizes when compiled
        self.decoder: Callable[[Tensor], Tensor] | None = model.decoder
        self.decode_dtype = torch.float32 if self.dtype == torch.float16 else self.dtype
        if self.compiled and model.decoder is not None:
            mode = _without_cuda_graphs(cfg.compile_mode)
            self.decoder = torch.compile(model.decoder, mode=mode, dynamic=False)
        if self.compiled:
            allow_recompiles(len(self.buckets) + 8)
        # rows per decoder call and their buckets; None until sized by memory (CUDA, no setting)
        self.decode_batch: int | None = None
        self.decode_buckets: tuple[int, ...] = ()
        self._decode_bytes: int | None = None  # the decoder's peak memory for one image (CUDA, once measured)
        self._set_decode_batch(self._default_decode_batch())
        self._side = _SideStream(self.device)  # where finished rows are decoded and copied to the host
        self.scheduler = Scheduler(cfg.max_batch, cfg.latency_slack, cfg.merge_ratio, self.buckets)
        # per timestep, whether guidance acts (the model's interval; None: at every one), on the host
        interval = model.guidance_interval
        self._guided_t = None if interval is None else guided_timesteps(model.schedule, interval).tolist()
        self._samplers: dict[tuple, Sampler] = {}
        # every (sampler, steps) pair's timesteps and update coefficients, appended in place up to
        # their capacity (a step graph reads them at fixed addresses: a new pair within capacity
        # needs no new recording)
        self._ts_table = torch.zeros(TABLE_CAPACITY, dtype=torch.long, device=self.device)
        self._coef_table = torch.zeros(TABLE_CAPACITY, len(COLUMNS), device=self.device)
        self._table_len = 0  # entries in use
        self._ts_host: list[int] = []  # the same table on the host: which steps need twins
        self._ts_offsets: dict[tuple, int] = {}
        self._canceled: set[Hashable] = set()
        self._batch: _Batch | None = None
        self._previews: list[Preview] = []
        self._timings: deque[tuple[Any, Any, int, str]] = deque(maxlen=100_000)  # (start, end, rows, sampler)
        self._network_rows = 0  # rows of the last network call, guidance twins included

    # --- the public surface ----------------------------------------------------------------------
    @property
    def step_time(self) -> dict[int, float]:
        """{bucket: seconds per step} from warm_up(), which the scheduler's latency check reads;
        a copy: assign a whole table to change it."""
        return self.scheduler.step_time

    @step_time.setter
    def step_time(self, table: dict[int, float]) -> None:
        self.scheduler.step_time = table

    @property
    def idle(self) -> bool:
        return not len(self.scheduler)

    @property
    def resident_rows(self) -> int:
        """Rows whose state (x, histories, indices) the engine keeps on the device between steps:
        the last batch's, until a step with a new selection or an idle engine lets go of it."""
        return 0 if self._batch is None else int(self._batch.x.shape[0])

    def __len__(self) -> int:
        """Requests queued or running."""
        return len(self.scheduler)

    def add(self, request: Request) -> None:
        """Queue a request; it joins the batch at a coming step."""
        if request.id in self.scheduler:
            raise ValueError(f"request {request.id!r} is already in the engine")
        self._validate(request)
        key = (request.sampler, tuple(sorted(request.options.items())))
        sampler = self._samplers.get(key)
        if sampler is None:
            sampler = self._samplers[key] = self.model.make_sampler(request.sampler, **request.options)
        offset = self._timesteps(key, sampler, request.steps)
        twin_at: tuple[bool, ...] = ()
        if request.guidance_scale != 1.0:
            ts = self._ts_host[offset : offset + request.steps]
            twin_at = tuple(self._guided_t is None or self._guided_t[t] for t in ts)
        peak_rows = request.count * (2 if any(twin_at) else 1)
        if peak_rows > self.config.max_batch:
            raise ValueError(
                f"request {request.id!r} needs {peak_rows} rows (guidance twins count); "
                f"max_batch is {self.config.max_batch}"
            )
        self.scheduler.add(request, twin_at).state = _Rows(sampler, offset)

    def cancel(self, request_id: Hashable) -> bool:
        """Drop a request: its rows leave the batch at the next step. False if unknown."""
        if request_id not in self.scheduler:
            return False
        self._canceled.add(request_id)
        return True

    def set_max_batch(self, max_batch: int) -> None:
        """Change the rows per network call (the service's user_config); never below the rows of
        a request already queued. New buckets compile on first use (warm_up compiles them), and
        the step-time table is kept for the buckets that stay."""
        largest = max((slot.peak_rows for slot in self.scheduler.slots), default=1)
        max_batch = max(max_batch, largest)  # a request already queued must still fit
        self.config = replace(self.config, max_batch=max_batch)
        self.buckets = _buckets(max_batch, self.config.buckets)
        self.scheduler.set_max_batch(max_batch, self.buckets)
        # graphs of buckets above it go (the running batch keeps its own until it changes)
        self._graphs = {key: g for key, g in self._graphs.items() if key.rows <= max_batch}
        if self.compiled:
            allow_recompiles(len(self.buckets) + 8)

    @property
    def decode_reserved_bytes(self) -> int:
        """Device memory this engine's decoder takes at its chunk: decode_batch images at the
        decoder's measured peak for one (`decode_reserve`). 0 for a pixel model, on a CPU, and
        until the decoder is measured (warm-up or the first decode). Decodes run on a side
        stream beside the steps of every engine on the device, so the memory a network is sized
        from (`max_batch_for_memory`) leaves out every engine's."""
        return decode_reserve(self.decode_batch, self._decode_bytes)

    def set_decode_batch(self, rows: int | None) -> None:
        """A latent model's images per decoder call; None: the engine's default again
        (max_decode_batch; on CUDA without it, sized by memory at the next warm-up or decode).
        The engine loop restores a decode chunk with it after a failed warm-up."""
        if rows is not None and rows < 1:
            raise ValueError(f"decode batch must be >= 1, got {rows}")
        if self.invariant_rows:
            rows = None  # one image per call: what makes decoding batch-invariant
        self._set_decode_batch(self._default_decode_batch() if rows is None else rows)

    def take_previews(self) -> list[Preview]:
        """The previews made since the last call, oldest first (Request.preview_every)."""
        out, self._previews = self._previews, []
        return out

    def progress(self) -> dict[Hashable, int]:
        """Steps done by each queued or running request."""
        return {slot.id: slot.pos for slot in self.scheduler.slots}

    @torch.no_grad()
    def step(self) -> list[Finished]:
        """Advance the selected requests by one denoising step; return those that finished."""
        self._drop_canceled()
        if self.idle:
            self._batch = None  # the last rows left (canceled): their tensors go (step graphs keep their buffers)
            return []
        selected, replanned = self.scheduler.schedule()
        started = self._mark()
        batch = self._batch
        if replanned:
            ordered = self._batch_order(selected)
            if batch is None or batch.slots != ordered:
                batch = self._assemble(ordered)
            else:
                batch.finish_at = self.scheduler.clock + min(s.remaining for s in ordered)
            self._refresh_twins(batch)
            self._bind_graph(batch)
        if batch.graph is not None:  # the whole step, 1.-2. below, in one replay
            return self._graph_step(batch, started)
        return self._launched_step(batch, started)

    def _launched_step(self, batch: _Batch, started: Any) -> list[Finished]:
        """The step op by op, each launched from here."""
        # 1. one network call for every row, at its own timestep, plus guidance twins
        t = self._ts_table.index_select(0, batch.rows)
        eps = self._eps(batch, t)
        # 2. every row's sampler update in one call, its coefficients gathered from the tables
        coef = self._coef_table.index_select(0, batch.rows)
        z = None
        if batch.noise is not None:  # step k uses noise draw k + 1, as Sampler.sample does
            done = batch.rows - batch.starts
            done = done if batch.noise_rows is None else done[batch.noise_rows]
            z = batch.noise.draw_rows(done + 1, self.model.sample_shape)
        batch.x, x0 = self._update(
            batch.x, eps, coef, batch.terms, thresholding=self.model.thresholding, history=batch.history,
            noise=z, noise_rows=batch.noise_rows,
        )  # fmt: skip
        if batch.history is not None:
            batch.history = x0
        batch.rows = batch.rows + 1
        return self._stepped(batch, x0, started)

    def _graph_step(self, batch: _Batch, started: Any) -> list[Finished]:
        """The step as one replay of the batch's step graph: its buffers hold the rows, which
        advance in place (batch.x, rows, history are views of them). A graph that cannot be
        recorded is logged and the step launched: out of memory, that key's steps from then on;
        any other failure (an op a graph cannot hold), every step (step graphs go off)."""
        graph = batch.graph
        if not graph.recorded:
            failed = None
            try:
                graph.record()
            except torch.cuda.OutOfMemoryError as e:  # this bucket's graph: launched from now on
                failed = f"out of memory ({e})"
                self._unrecordable.add(graph.key)
            except RuntimeError as e:  # an op a graph cannot hold: every graph would fail alike
                failed = repr(e)
                self.step_graphs = False
            if failed is not None:
                # here, past the except clauses, the error's frames (the recording's tensors) are gone
                log.warning("step graph %s not recorded: %s; steps run op by op", graph.key, failed)
                self._graphs.pop(graph.key, None)
                batch.graph = graph = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return self._launched_step(batch, started)
        graph.replay()
        self._network_rows = graph.n + len(batch.twin_rows)
        x0 = None if graph.x0 is None else graph.x0[: graph.n]
        return self._stepped(batch, x0, started)

    def _stepped(self, batch: _Batch, x0: Tensor | None, started: Any) -> list[Finished]:
        """After a step's arithmetic: the clock, previews, the step's timing, finished requests."""
        self.scheduler.advance()
        if batch.previews:
            self._capture_previews(batch, x0)
        self._timings.append((started, self._mark(), self._network_rows, batch.sampler_name))
        if self.scheduler.clock >= batch.finish_at:
            return self._collect_finished(batch)
        return []

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

    def _capture_previews(self, batch: _Batch, x0: Tensor) -> None:
        """3. a preview of each previewing request whose step count just reached a multiple of
        its preview_every (not its last step: that is the image itself)."""
        latent = self.model.is_latent
        for slot, row in batch.previews:
            every, steps, pos = slot.request.preview_every, slot.request.steps, slot.pos
            if latent:  # a decode per preview: not more often than preview_decode_every
                every = max(every, self.config.preview_decode_every)
            if pos % every == 0 and pos < steps:
                first = x0[row : row + 1]
                if batch.graph is not None:  # the next replay overwrites it: a copy for the side stream
                    first = first.clone()
                with self._side.after(first):
                    host, ready, _ = self._to_host(first)
                self._previews.append(Preview(slot.request, pos, host, ready))

    # --- assembling a batch ------------------------------------------------------------------------
    def _batch_order(self, selected: list[Slot]) -> list[Slot]:
        """The selected requests grouped by sampler (in order of first arrival), each group in
        arrival order: every sampler's rows are then one contiguous range of the batch."""
        rank: dict[int, int] = {}
        for slot in selected:
            rank.setdefault(id(slot.state.sampler), len(rank))
        if len(rank) == 1:
            return selected
        return sorted(selected, key=lambda s: rank[id(s.state.sampler)])  # stable: arrival order within

    def _assemble(self, ordered: list[Slot]) -> _Batch:
        """The batch of `ordered` from the old batch's rows, the paused requests' rows and one
        x_T draw for every request that starts: a fixed number of tensor ops, whatever the
        number of requests. Requests of the old batch that are not selected are paused (their
        rows are set aside in one gather)."""
        old, dev = self._batch, self.device
        at: dict[int, int] = {}  # id(slot) -> its first row in the old batch
        old_history: dict[int, tuple[Tensor, int]] = {}  # id(slot) -> (the old batch's history, its row)
        if old is not None:
            at = {id(slot): lo for slot, (lo, _hi) in zip(old.slots, old.bounds, strict=True)}
            if old.history is not None:
                old_history = {id(s): (old.history, at[id(s)]) for s in old.slots if s.state.sampler.multistep}
            chosen = {id(slot) for slot in ordered}
            paused = [s for s in old.slots if id(s) not in chosen and self.scheduler.get(s.id) is s]
            self._park(old, paused, at, old_history)
        # x_T for every request that starts: one draw (noise draw 0, as in Sampler.sample)
        starting = [s for s in ordered if id(s) not in at and s.state.x is None]
        fresh = self._noise([s.request for s in starting]).draw(0, self.model.sample_shape) if starting else None
        # the batch's rows, from where each request's rows are
        pieces, bounds, begin, fresh_row = [], [], 0, 0
        for slot in ordered:
            n = slot.request.count
            if id(slot) in at:
                pieces.append((old.x, at[id(slot)], n))
            elif slot.state.x is not None:
                pieces.append((*slot.state.x, n))
            else:
                pieces.append((fresh, fresh_row, n))
                fresh_row += n
            bounds.append((begin, begin + n))
            begin += n
        x = _gather(pieces, dev)
        samplers = [slot.state.sampler for slot in ordered]
        history = self._history(ordered, old_history) if any(s.multistep for s in samplers) else None
        noise, noise_rows = self._noise_keys(ordered, bounds)
        previews = [(slot, lo) for slot, (lo, _) in zip(ordered, bounds, strict=True) if slot.request.preview_every]
        for slot in ordered:
            slot.state.x = slot.state.history = None  # the batch holds its rows now
        # per-row tables, built on the host and copied once each
        rows, starts, labels = [], [], []
        conditional = self.model.num_classes is not None
        for slot in ordered:
            r, state = slot.request, slot.state
            rows += [state.ts_offset + slot.pos] * r.count
            starts += [state.ts_offset] * r.count
            if conditional:
                labels += r.labels
        as_long = lambda values: _host_to_device(torch.tensor(values, dtype=torch.long), dev)  # noqa: E731
        names = {slot.request.sampler for slot in ordered}
        batch = _Batch(
            slots=ordered,
            bounds=bounds,
            x=x,
            rows=as_long(rows),
            starts=as_long(starts),
            labels=as_long(labels) if conditional else None,
            terms=batch_terms(samplers),
            noise=noise,
            noise_rows=noise_rows,
            history=history,
            guided=[
                (slot, lo, hi)
                for slot, (lo, hi) in zip(ordered, bounds, strict=True)
                if conditional and slot.request.guidance_scale != 1.0
            ],
            previews=previews,
            sampler_name=names.pop() if len(names) == 1 else "mixed",
            finish_at=self.scheduler.clock + min(s.remaining for s in ordered),
        )
        self._batch = batch
        return batch

    def _noise(self, requests: list[Request]) -> ImageNoise:
        """The noise keys of the requests' images, one request after the other (drawn through the
        compiled draw where the engine compiles)."""
        noise = ImageNoise.for_requests(
            [r.seed for r in requests], [r.start for r in requests], [r.count for r in requests], self.device
        )
        return noise.with_compiled_draws() if self.compiled else noise

    def _park(
        self, old: _Batch, paused: list[Slot], at: dict[int, int], old_history: dict[int, tuple[Tensor, int]]
    ) -> None:
        """Set the rows (and histories) of requests leaving the batch unfinished aside, in one
        gather each, until they run again."""
        if not paused:
            return
        parked = _gather([(old.x, at[id(s)], s.request.count) for s in paused], self.device)
        if parked is old.x and old.graph is not None:  # a graph's buffer is written again
            parked = parked.clone()
        begin = 0
        for slot in paused:
            slot.state.x = (parked, begin)
            begin += slot.request.count
        multistep = [s for s in paused if id(s) in old_history]
        kept = _gather([(*old_history[id(s)], s.request.count) for s in multistep], self.device)
        if kept is not None and kept is old.history and old.graph is not None:
            kept = kept.clone()
        begin = 0
        for slot in multistep:
            slot.state.history = (kept, begin)
            begin += slot.request.count

    def _noise_keys(
        self, ordered: list[Slot], bounds: list[tuple[int, int]]
    ) -> tuple[ImageNoise | None, Tensor | None]:
        """The noise keys of the rows whose sampler draws noise, and those rows (None: all)."""
        drawing = [(slot, b) for slot, b in zip(ordered, bounds, strict=True) if slot.state.sampler.needs_noise]
        if not drawing:
            return None, None
        noise = self._noise([slot.request for slot, _ in drawing])
        if len(drawing) == len(ordered):
            return noise, None
        rows = [row for _, (lo, hi) in drawing for row in range(lo, hi)]
        return noise, _host_to_device(torch.tensor(rows, dtype=torch.long), self.device)

    def _history(self, ordered: list[Slot], old_history: dict[int, tuple[Tensor, int]]) -> Tensor:
        """Every row's previous x_0 when a multistep sampler runs: a multistep request's from the
        old batch or from where it was set aside at a pause; zeros on a row's first step and for
        the other samplers' rows (multiplied by 0 there, but read, so they must be finite)."""
        new = sum(s.request.count for s in ordered if id(s) not in old_history and s.state.history is None)
        zeros = torch.zeros(new, *self.model.sample_shape, device=self.device) if new else None
        pieces, zeros_at = [], 0
        for slot in ordered:
            n = slot.request.count
            if id(slot) in old_history:
                pieces.append((*old_history[id(slot)], n))
            elif slot.state.history is not None:
                pieces.append((*slot.state.history, n))
            else:
                pieces.append((zeros, zeros_at, n))
                zeros_at += n
        return _gather(pieces, self.device)

    # --- the network ---------------------------------------------------------------------------------
    def _eps(self, batch: _Batch, t: Tensor) -> Tensor:
        """eps for every row, guided where the scale is not 1: [B, C, H, W] float32."""
        x, labels, twins = batch.x, batch.labels, batch.twins
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

    def _refresh_twins(self, batch: _Batch) -> None:
        """The rows whose null-class twin runs from this step: those of guided requests at a
        timestep inside the model's guidance interval (plain conditional steps outside it need
        none). Every row of a request is at the same step, so this is decided per request on the
        host, when the schedule is re-evaluated (a twin switching on or off re-evaluates it); the
        index tensors are rebuilt only when the set changes."""
        if not batch.guided:
            return
        key = tuple(i for i, (slot, _, _) in enumerate(batch.guided) if slot.twins)
        if key != batch.twin_key:
            active = [batch.guided[i] for i in key]
            rows = [row for _, lo, hi in active for row in range(lo, hi)]
            scales = [slot.request.guidance_scale for slot, lo, hi in active for _ in range(lo, hi)]
            batch.twin_key, batch.twin_rows, batch.twin_scales = key, rows, scales
            batch.twins = _host_to_device(torch.tensor(rows, dtype=torch.long), self.device) if rows else None
            batch.scales = _host_to_device(torch.tensor(scales), self.device).view(-1, 1, 1, 1) if rows else None

    # --- the step graphs ----------------------------------------------------------------------------
    def _graph_key(self, batch: _Batch) -> GraphKey | None:
        """The step graph that runs this batch's steps: its bucket holds the rows and their
        guidance twins, as the launched step's network call does. None where the steps run
        launch by launch: step graphs off, batch-invariant slices (a call per slice), or a key
        whose recording failed."""
        if not self.step_graphs or self.invariant_rows:
            return None
        key = GraphKey(
            rows=self.scheduler.bucket(batch.x.shape[0] + len(batch.twin_rows)),
            terms=batch.terms,
            noise=batch.noise is not None,
            history=batch.history is not None,
            previews=bool(batch.previews),
            guided=bool(batch.twin_rows),
        )
        return None if key in self._unrecordable else key

    def _bind_graph(self, batch: _Batch) -> None:
        """When the selection or its twins changed: move the batch's rows into the buffers of the
        step graph that runs it (recorded at its first replay; made and recorded again once the
        engine's tables have outgrown their capacity), or out of graphs. Rows leave a graph
        without a copy: the launch-by-launch step reads the buffers' views and writes new tensors."""
        key = self._graph_key(batch)
        if key is None:
            batch.graph = None
            return
        tables = (self._ts_table, self._coef_table)
        graph = self._graphs.get(key)
        if graph is None or any(a is not b for a, b in zip(graph.tables, tables, strict=True)):
            graph = self._graphs[key] = StepGraph(
                key, self.model.sample_shape, self.model.num_classes is not None, self.device,
                self._record_step, tables, self._graph_pool,
            )  # fmt: skip
            log.info(
                "step graph for %d rows (%s%s%s%s)", key.rows, "+".join(sorted(key.terms)) or "x0",
                ", noise" * key.noise, ", history" * key.history, ", guided" * key.guided,
            )  # fmt: skip
        if batch.graph is graph and batch.loaded_twins == batch.twin_key:  # its rows are there already
            return
        n = batch.x.shape[0]
        seeds = indices = None
        if batch.noise is not None:  # every row draws; a row whose sampler adds none has c_z = 0
            seeds, indices = batch.noise.seeds, batch.noise.indices
            if batch.noise_rows is not None:
                seeds = seeds.new_zeros(n).index_copy_(0, batch.noise_rows, seeds)
                indices = indices.new_zeros(n).index_copy_(0, batch.noise_rows, indices)
        graph.load(
            batch.x, batch.rows, batch.starts, batch.labels, seeds, indices, batch.history,
            guidance=self._guidance(batch, key.rows) if key.guided else None,
        )  # fmt: skip
        batch.loaded_twins = batch.twin_key
        batch.x, batch.rows, batch.starts = graph.x[:n], graph.rows[:n], graph.starts[:n]
        if batch.history is not None:
            batch.history = graph.x0[:n]
        batch.graph = graph

    def _guidance(self, batch: _Batch, rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """A guided graph's (src, net_labels, pair, scale) for this batch's twins, each [rows]
        (`StepGraph`), built on the host and copied once each."""
        n, twins = batch.x.shape[0], batch.twin_rows
        g = len(twins)
        src = list(range(n)) + twins + [0] * (rows - n - g)
        pair = list(range(rows))
        scale = [0.0] * rows
        for slot, (row, s) in enumerate(zip(twins, batch.twin_scales, strict=True)):
            pair[row], scale[row] = n + slot, s
        host_labels = torch.zeros(rows, dtype=torch.long)
        host_labels[n : n + g] = NULL_CLASS
        net_labels = _host_to_device(host_labels, self.device)
        net_labels[:n].copy_(batch.labels)
        as_long = lambda values: _host_to_device(torch.tensor(values, dtype=torch.long), self.device)  # noqa: E731
        scale_t = _host_to_device(torch.tensor(scale), self.device).view(rows, *([1] * len(self.model.sample_shape)))
        return as_long(src), net_labels, as_long(pair), scale_t

    def _record_step(self, graph: StepGraph) -> None:
        """One step of a step graph's rows, in place (undiffuse.step_graph): the ops of `step`,
        on the graph's buffers and the tables it was made with."""
        ts_table, coef_table = graph.tables
        t = ts_table.index_select(0, graph.rows)
        if graph.src is None:
            eps = self._forward(graph.x, t, graph.labels)
        else:  # the rows, then their null-class twins, in one call; eps_u + s * (eps_c - eps_u)
            out = self._forward(graph.x.index_select(0, graph.src), t.index_select(0, graph.src), graph.net_labels)
            eps_u = out.index_select(0, graph.pair)
            eps = eps_u + graph.scale * (out - eps_u)  # Ho & Salimans 2022; scale 0 and eps_u = eps_c without a twin
        coef = coef_table.index_select(0, graph.rows)
        z = None
        if graph.seeds is not None:  # step k uses noise draw k + 1, as Sampler.sample does
            draws = (graph.rows - graph.starts + 1)[:, None]
            draw = compiled_normals() if self.compiled else normals
            z = draw(graph.seeds, graph.indices, draws, tuple(self.model.sample_shape), torch.float32)
        x, x0 = self._update(
            graph.x, eps, coef, graph.key.terms, thresholding=self.model.thresholding,
            history=graph.x0 if graph.key.history else None, noise=z,
        )  # fmt: skip
        torch.where(graph.live_mask, x, graph.x, out=graph.x)  # padding stays as it is
        if graph.x0 is not None:
            graph.x0.copy_(x0)
        graph.rows.add_(graph.live)

    def _forward(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        """The network at the engine's precision, on slices of invariant_rows rows (else padded to
        a bucket when compiled); returns eps in float32 (v predictions converted in float32).
        With step graphs autocast does not cache its casts of the weights (inside a graph the
        cached copies would be freed memory at the next replay), in warm-up and launched steps
        too, so that a compiled network is compiled once, for both."""
        n = x.shape[0]
        if self.compiled and not self.invariant_rows:
            x, t, labels = pad_rows(x, t, labels, self.scheduler.bucket(n) - n)
        if self.config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = self.dtype != torch.float32
        with torch.autocast(
            self.device.type, dtype=self.dtype, enabled=amp, cache_enabled=False if self.step_graphs else None
        ):
            out = in_slices(self.network, x, t, labels, self.invariant_rows)
        if out.shape[0] != n:
            out, x, t = out[:n], x[:n], t[:n]
        if out.dtype != torch.float32:
            out = out.float()
        return self.model.eps_from_output(x if x.dtype == torch.float32 else x.float(), t, out)

    # --- results ---------------------------------------------------------------------------------------
    def _collect_finished(self, batch: _Batch) -> list[Finished]:
        """The requests whose rows all reached x_0 leave in one gather and one copy to the host
        (`_to_host`)."""
        done = [(slot, b) for slot, b in zip(batch.slots, batch.bounds, strict=True) if slot.remaining == 0]
        if not done:
            batch.finish_at = self.scheduler.clock + min(s.remaining for s in batch.slots)
            return []
        if len(done) == len(batch.slots):
            x = batch.x if batch.graph is None else batch.x.clone()  # (a graph's buffer is written again)
        else:
            x = _gather([(batch.x, lo, hi - lo) for _, (lo, hi) in done], self.device)
        keep = self.config.keep_samples
        with self._side.after(x):
            host, ready, images = self._to_host(x, keep)
        samples = None
        if keep:  # never written in place: steps make new tensors
            samples = self._side.join(images)  # the main stream waits for the decode (tests, benchmarks only)
        out, begin = [], 0
        for slot, (lo, hi) in done:
            out.append(Finished(slot.request, host, (begin, begin + hi - lo), ready, samples))
            begin += hi - lo
            self.scheduler.remove(slot.id)
        if len(done) == len(batch.slots):
            self._batch = None
        return out

    def _to_host(self, x: Tensor, keep: bool = False) -> tuple[Tensor, torch.cuda.Event | None, Tensor | None]:
        """Rows of x_0 (a latent model's latents) -> (uint8 [N, H, W, C] in pinned host memory, the
        event that marks its copy done or None on a CPU, and with `keep` the float32 images
        [N, C, H, W]). A pixel model's rows take one conversion and one copy; a latent model's are
        decoded and converted a chunk at a time (`_decode`), then copied at once. Called on the
        side stream."""
        if self.decoder is None:
            host, ready = self._pixels_to_host(_to_pixels(x))
            return host, ready, x if keep else None
        pixels, images = self._decode(x, keep)
        host, ready = self._pixels_to_host(pixels)
        return host, ready, images

    def _decode(self, x: Tensor, keep: bool = False) -> tuple[Tensor, Tensor | None]:
        """A latent model's latents [N, c, h, w] -> (uint8 images [N, H, W, C] on the device, and
        with `keep` the float32 images [N, C, H, W]), `decode_batch` latents per decoder call. Each
        chunk is converted into its rows of one uint8 tensor as soon as it is decoded, so the
        float images of one chunk at a time are alive (all of them only with `keep`), however
        many rows finish at a step.

        A chunk that runs out of device memory is retried from where it failed at half the size
        of the failed call (`_shrink_decode_batch`, which keeps the smaller chunk for later
        decodes); a call of one image that does not fit raises. Called on the side stream;
        nothing here reads the device, except the one-time sizing of the chunk
        (`_size_decode_batch`) and that recovery."""
        n = x.shape[0]
        pixels: Tensor | None = None
        images: Tensor | None = None
        lo = 0
        while lo < n:
            hi = min(n, lo + (self.decode_batch or self._size_decode_batch()))
            try:
                chunk = self._decode_chunk(x[lo:hi])
            except torch.cuda.OutOfMemoryError:
                failed = self._decode_rows(hi - lo)
                if failed <= 1:  # one image that does not fit: a smaller chunk cannot help
                    raise
            else:
                if pixels is None:
                    c, h, w = chunk.shape[1:]
                    pixels = torch.empty(n, h, w, c, dtype=torch.uint8, device=chunk.device)
                    images = torch.empty(n, c, h, w, device=chunk.device) if keep else None
                if images is not None:
                    images[lo:hi] = chunk
                _to_pixels(chunk, out=pixels[lo:hi])
                lo, chunk = hi, None
                continue
            # here, past the except clause, the error and its traceback (which holds the failed
            # call's tensors) are gone, so that their memory can go back to the device
            self._shrink_decode_batch(failed)
        if pixels is None:  # no rows
            c, h, w = self.model.image_shape
            pixels = torch.empty(0, h, w, c, dtype=torch.uint8, device=x.device)
            images = torch.empty(0, c, h, w, device=x.device) if keep else None
        return pixels, images

    def _shrink_decode_batch(self, failed_rows: int) -> None:
        """After a decoder call of failed_rows images (padding included) ran out of memory: the
        cached blocks go back to the device, and decode_batch becomes half the failed call,
        for this decode and the later ones (batch-invariant decoding calls one image at a time,
        which is never halved)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = self.decode_batch
        self._set_decode_batch(max(1, failed_rows // 2))
        log.warning(
            "decoder out of memory at %d images per call; decoding %d per call from now on%s",
            failed_rows,
            self.decode_batch,
            f" (the chunk was {before})" if before != failed_rows else "",
        )

    def _size_decode_batch(self, reserved_elsewhere: int = 0) -> int:
        """max_decode_batch=None on CUDA: as many images as `decode_batch_for_memory` fits in the
        device memory free now, less `reserved_elsewhere` (what other engines' decoders take at
        their chunks), at the decoder's peak for one image (`_measure_decode`). Memory the
        caching allocator holds but no tensor uses does not count as free: it is the steps'
        working set, and decodes run beside the steps. Run on the side stream, so that the
        probe's blocks are cached where decodes allocate. On a CPU: the engine's default."""
        dev = self.device
        if dev.type != "cuda":
            self._set_decode_batch(self._default_decode_batch() or CPU_DECODE_BATCH)
            return self.decode_batch
        torch.cuda.synchronize(dev)
        free, _total = torch.cuda.mem_get_info(dev)
        per_image = self._measure_decode()
        self._set_decode_batch(decode_batch_for_memory(free - reserved_elsewhere, per_image))
        return self.decode_batch

    def _measure_decode(self) -> int:
        """The decoder's peak device memory for one image, in bytes: measured once (CUDA), with the
        device idle (a synchronization), then kept."""
        if self._decode_bytes is None:
            dev = self.device
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            probe = torch.zeros(1, *self.model.sample_shape, device=dev)
            with torch.autocast(dev.type, dtype=self.decode_dtype, enabled=self.decode_dtype != torch.float32):
                self.model.decoder(probe)  # eager, so that sizing compiles nothing; fused kernels need less
            torch.cuda.synchronize(dev)
            self._decode_bytes = max(0, torch.cuda.max_memory_allocated(dev) - base)
        return self._decode_bytes

    def _default_decode_batch(self) -> int | None:
        """Rows per decoder call unless changed: one where images are batch-invariant (as
        DiffusionModel.decode, whatever max_decode_batch says); else max_decode_batch; None (sized
        by memory) on CUDA; CPU_DECODE_BATCH on a CPU."""
        if self.invariant_rows:
            return 1
        if self.config.max_decode_batch is not None:
            return self.config.max_decode_batch
        return None if self.device.type == "cuda" else CPU_DECODE_BATCH

    def _set_decode_batch(self, rows: int | None) -> None:
        self.decode_batch = rows
        self.decode_buckets = () if rows is None else _buckets(rows, None)
        if self.compiled and rows is not None:
            allow_recompiles(max(len(self.buckets), len(self.decode_buckets)) + 8)

    def _decode_rows(self, n: int) -> int:
        """The images a decoder call for n latents runs, padding included: a decode bucket when
        compiled, else n (batch-invariant decoding calls one image at a time)."""
        if self.compiled and not self.invariant_rows:  # one compiled graph per decode bucket, as for the network
            return self.decode_buckets[bisect.bisect_left(self.decode_buckets, n)]
        return n

    def _decode_chunk(self, x: Tensor) -> Tensor:
        """One decoder call: latents [n, c, h, w] -> float32 images [n, C, H, W], padded as
        `_decode_rows` says and cut back to n."""
        n = x.shape[0]
        pad = self._decode_rows(n) - n
        if pad:
            x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        with torch.autocast(self.device.type, dtype=self.decode_dtype, enabled=self.decode_dtype != torch.float32):
            images = self.decoder(x)
        return images[:n].float()

    def _pixels_to_host(self, pixels: Tensor) -> tuple[Tensor, torch.cuda.Event | None]:
        """uint8 [N, H, W, C] on the device -> one async copy to pinned host memory; returns it
        with the event that marks the copy done (None on a CPU, where it is the pixels
        themselves), recorded on the current stream: the side stream, where it is called.
        Pinned blocks come from PyTorch's caching host allocator, which hands a block out again
        once the copies recorded on it are done: one buffer per finishing step, reused."""
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
            self.scheduler.remove(rid)  # its rows leave when the schedule is re-evaluated
        self._canceled.clear()

    # --- set-up ------------------------------------------------------------------------------------------
    def _timesteps(self, key: tuple, sampler: Sampler, steps: int) -> int:
        """Offset of (sampler, steps)'s timestep list, followed by LAST, in the shared table; the
        coefficient table has each entry's `update` coefficients at the same offsets. Entries are
        written in place while the tables have room; past it the tables double (new tensors,
        which the step graphs then record again)."""
        full = (*key, steps)
        offset = self._ts_offsets.get(full)
        if offset is None:
            ts = sampler.timesteps(steps)
            values = [*ts, previous_timesteps(ts)[-1]]
            offset = self._ts_offsets[full] = self._table_len
            end = offset + len(values)
            if end > self._ts_table.shape[0]:
                grown = max(end, 2 * self._ts_table.shape[0])
                self._ts_table = torch.cat([self._ts_table, self._ts_table.new_zeros(grown - self._ts_table.shape[0])])
                self._coef_table = torch.cat(
                    [self._coef_table, self._coef_table.new_zeros(grown - self._coef_table.shape[0], len(COLUMNS))]
                )
            self._ts_table[offset:end].copy_(_host_to_device(torch.tensor(values, dtype=torch.long), self.device))
            self._coef_table[offset:end].copy_(_host_to_device(sampler.coefficient_table(steps), self.device))
            self._table_len = end
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
        elif request.guidance_scale != 1.0 and not m.guidable:
            raise ValueError(f"request {request.id!r}: the model has no unconditional class to guide against")
        if request.preview_every is not None and request.preview_every < 1:
            raise ValueError(f"request {request.id!r}: preview_every must be >= 1")

    @torch.no_grad()
    def warm_up(
        self, max_seconds: float = 120.0, log: Callable[[str], None] | None = None, decoder: bool = True
    ) -> dict[int, float]:
        """Run every bucket once (compiling it when compiled) and time a second call of each,
        smallest first, until max_seconds have passed. Fills `step_time`, which the scheduler's
        latency check reads. Returns {bucket: seconds per step}. decoder: then `warm_up_decoder`
        within what is left of max_seconds (the engine loop warms every engine's network first,
        then every decoder)."""
        started = time.perf_counter()
        c, h, w = self.model.sample_shape
        table = self.step_time
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
            table[b] = time.perf_counter() - t0
            if log:
                log(f"bucket {b}: {table[b] * 1e3:.1f} ms per step")
        self.step_time = table
        if decoder:
            self.warm_up_decoder(max_seconds - (time.perf_counter() - started), log)
        return dict(table)

    @torch.no_grad()
    def warm_up_decoder(
        self, max_seconds: float = 120.0, log: Callable[[str], None] | None = None, reserved_elsewhere: int = 0
    ) -> None:
        """A latent model's decoder, on the side stream where decodes run (their blocks are cached
        there): on CUDA its memory for one image measured (what `decode_reserved_bytes`
        counts); its chunk sized, if unset and not sized yet, from the memory free now less
        `reserved_elsewhere` (the other engines' `decode_reserved_bytes`), so after the networks
        have taken theirs; when compiled, every decode bucket compiled until max_seconds have
        passed, a bucket that runs out of memory halving the chunk as a decode does (the larger
        buckets are then skipped). Nothing for a pixel model."""
        if self.decoder is None:
            return
        started = time.perf_counter()
        c, h, w = self.model.sample_shape
        with self._side.after():
            if self.decode_batch is None:
                self._size_decode_batch(reserved_elsewhere)
                if log:
                    log(f"decoder: {self.decode_batch} images per call")
            elif self.device.type == "cuda":
                self._measure_decode()
            if self.compiled:  # compile every decode bucket too
                for b in list(self.decode_buckets):
                    if time.perf_counter() - started > max_seconds:
                        break
                    if b > (self.decode_batch or b):
                        continue  # past a chunk halved below
                    try:
                        self._decode_chunk(torch.zeros(b, c, h, w, device=self.device))
                    except torch.cuda.OutOfMemoryError:
                        if b <= 1:
                            raise
                    else:
                        continue
                    self._shrink_decode_batch(b)  # past the except clause: the failed call's tensors are gone
        _sync(self.device)

    def measure_decoder(self) -> None:
        """On CUDA, a latent decoder's memory for one image, measured once (on the side stream,
        where decodes allocate), so that `decode_reserved_bytes` counts a chunk set by
        max_decode_batch before any decode ran. Nothing on a CPU or for a pixel model."""
        if self.decoder is not None and self.device.type == "cuda":
            with self._side.after():
                self._measure_decode()


def _gather(pieces: list[tuple[Tensor, int, int]], device: torch.device) -> Tensor | None:
    """cat(t[lo : lo + n] for t, lo, n in pieces) in at most three tensor ops, whatever the
    number of pieces: one cat of the distinct sources, one index built on the host, one gather
    (none where the pieces are one whole source in order). None for no pieces."""
    if not pieces:
        return None
    sources: list[Tensor] = []
    base: dict[int, int] = {}
    for tensor, _, _ in pieces:
        if id(tensor) not in base:
            base[id(tensor)] = sum(s.shape[0] for s in sources)
            sources.append(tensor)
    index: list[int] = []
    for tensor, lo, n in pieces:
        first = base[id(tensor)] + lo
        index.extend(range(first, first + n))
    source = sources[0] if len(sources) == 1 else torch.cat(sources)
    if len(index) == source.shape[0] and index == list(range(len(index))):
        return source
    return source.index_select(0, _host_to_device(torch.tensor(index, dtype=torch.long), device))


def _host_to_device(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor on the device without waiting for it: pinned memory, asynchronous copy."""
    if device.type == "cuda":
        return values.pin_memory().to(device, non_blocking=True)
    return values


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


def _without_cuda_graphs(mode: str) -> str:
    """The torch.compile mode that compiles as `mode` does, without CUDA graphs."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def _to_pixels(x: Tensor, out: Tensor | None = None) -> Tensor:
    """[N, C, H, W] float32 in [-1, 1] -> uint8 [N, H, W, C] (values outside are clipped; the
    arithmetic of undiffuse.images.to_uint8), written into `out` when given. One float
    temporary the size of x; x itself is left as it is."""
    levels = x.clamp(-1, 1).add_(1).mul_(127.5).round_().permute(0, 2, 3, 1)
    if out is None:
        return levels.to(torch.uint8)
    return out.copy_(levels)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_batch_for_memory(
    free_bytes: int, bytes_per_image: int, cap: int = DECODE_BATCH_CAP, fraction: float = DECODE_MEMORY_FRACTION
) -> int:
    """Rows per decoder call: as many images as `fraction` of free_bytes holds at
    bytes_per_image each, within [1, cap], rounded down to a decode bucket (a power of two, or
    cap itself), so that a full chunk runs unpadded. The fraction leaves the rest to the steps
    that run beside the decode and to the decoder's round-off from its one-image measurement."""
    rows = int(max(0, free_bytes) * fraction // max(1, bytes_per_image))
    buckets = _buckets(cap, None)
    return buckets[max(0, bisect.bisect_right(buckets, rows) - 1)]


def decode_reserve(decode_batch: int | None, bytes_per_image: int | None) -> int:
    """Device memory a decoder takes at its chunk: decode_batch images at bytes_per_image each
    (its measured peak for one); 0 while either is unknown."""
    return (decode_batch or 0) * max(0, bytes_per_image or 0)


def rows_for_memory(
    free_bytes: int,
    cached_bytes: int,
    bytes_per_row: int,
    setting: int,
    fraction: float = 0.8,
    decode_reserved_bytes: int = 0,
) -> int:
    """max_batch_for_memory's arithmetic: min(setting, the rows that `fraction` of the memory
    the steps may take holds at bytes_per_row), at least 1. The steps may take the free memory
    and what the caching allocator holds but no tensor uses, less what the decoders of every
    engine on the device take at their chunks (decode_reserved_bytes): their blocks sit in the
    side streams' pools, which the steps cannot use, or are free now and taken at the next
    decode."""
    room = max(0, free_bytes + cached_bytes - max(0, decode_reserved_bytes))
    return max(1, min(setting, int(room * fraction // max(1, bytes_per_row))))


def max_batch_for_memory(
    model: DiffusionModel,
    setting: int,
    dtype: torch.dtype = torch.bfloat16,
    fraction: float = 0.8,
    probe_rows: int = 32,
    decode_reserved_bytes: int = 0,
) -> int:
    """The largest batch (rows per network call) that fits: min(setting, what `fraction` of the
    device memory not held by tensors, less decode_reserved_bytes (every engine's
    `DenoisingEngine.decode_reserved_bytes`), takes at the activation memory per row, measured
    with a probe forward at the engine's precision; `rows_for_memory`). Memory the caching
    allocator holds but no tensor uses counts as free. On a CPU: the setting."""
    device = model_device(model)
    if device.type != "cuda":
        return setting
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    c, h, w = model.sample_shape
    x = torch.randn(probe_rows, c, h, w, device=device)
    t = torch.zeros(probe_rows, dtype=torch.long, device=device)
    labels = None if model.num_classes is None else torch.zeros(probe_rows, dtype=torch.long, device=device)
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
        model.network(x, t, labels)
    torch.cuda.synchronize(device)
    per_row = max(1, (torch.cuda.max_memory_allocated(device) - base) // probe_rows)
    del x, t, labels
    free, _total = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return rows_for_memory(free, cached, per_row, setting, fraction, decode_reserved_bytes)
