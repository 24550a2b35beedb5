"""A whole denoising step as one CUDA graph: the engine's rows in static device buffers.

A compiled step at a small batch is launch-bound: the network's ~230 kernels, the timestep and
coefficient gathers, the noise draw and the sampler update are each launched from Python. A
`StepGraph` records all of them once, for one bucket of rows, and replays them with a single
launch per step:

    t     = ts_table[rows]                      the rows' timesteps, from the engine's table
    eps   = network(x, t, labels)               bucket rows: the live ones, then padding
    coef  = coef_table[rows]                    each row's sampler coefficients
    z     = draw(seeds, indices, rows - starts + 1)      every row's draw (c_z = 0 where unused)
    x, x0 = update(x, eps, coef, terms, history=x0, noise=z)    written back into x and x0
    rows += live                                the live rows advance one step; padding stays

With guidance the network runs on x[src] (the live rows, then a copy of each guided row: its
null-class twin, labelled by `net_labels`), and each row's eps is
ε_u + scale · (ε_c − ε_u) with ε_u the output at `pair` (its twin's slot; the row itself, at
scale 0, for a row without a twin, which leaves its ε_c exactly as it is). The twins' slots are
padding in x, so one bucket holds n live rows and their G twins, as the launched step's call does.

Everything the graph reads or writes lives in buffers allocated once per graph (`x`, `rows`,
`starts`, `live`, `labels`, `seeds`, `indices`, `x0`); the engine `load`s a batch into them when
its membership changes and reads its rows back from them (views, valid until the next replay).
Padding rows hold zeros at table entry 0 and never change or advance (the update writes back
the live rows of x only; a padding row's x0 is its own, read by nothing else), so they stay
valid inputs forever.

PyTorch's own graphs (`torch.compile(mode="reduce-overhead")`) graph the network alone, and
skip graphs whose inputs are mutated in place, so they cannot hold the sampler's update; here the
engine owns the buffers and the mutation is the point. Graphs of one engine share one memory pool:
they replay one at a time on one stream and no graph leaves a tensor alive in the pool, so a
pool the size of the largest step serves every bucket.

On a CPU there is nothing to capture: `replay` runs the same step on the same buffers, which is
what lets the CPU tests check the buffer handling against the engine's launch-by-launch path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

WARM_UP_RUNS = 2  # step runs on scratch buffers before capture: compiles, cuDNN plans, allocations


@dataclass(frozen=True)
class GraphKey:
    """What one graph is recorded for: its rows (a bucket), the update's terms, and what else it
    reads or keeps: noise draws, a multistep sampler's previous x0 (history), the x0 prediction
    that previews are taken from."""

    rows: int
    terms: frozenset[str]
    noise: bool
    history: bool
    previews: bool
    guided: bool = False

    @property
    def keeps_x0(self) -> bool:
        return self.history or self.previews


class StepGraph:
    """The static buffers of one `GraphKey` and the graph that steps them (see the module docs).

    sample_shape: (C, H, W) of a row; conditional: whether the network takes labels. `step` is
    the step itself, a function of this object's buffers that updates them in place.
    """

    def __init__(
        self,
        key: GraphKey,
        sample_shape: tuple[int, ...],
        conditional: bool,
        device: torch.device,
        step: Callable[[StepGraph], None],
        tables: tuple[Tensor, ...],
        pool: tuple | None = None,
    ) -> None:
        self.key = key
        self.device = device
        self._step = step
        self.tables = tables  # the engine's tables the graph reads: it is recaptured when they are replaced
        self._pool = pool
        b = key.rows
        long = dict(dtype=torch.long, device=device)
        self.x = torch.zeros(b, *sample_shape, device=device)  # [b, C, H, W] float32
        self.rows = torch.zeros(b, **long)  # [b]: each row's entry in the engine's tables
        self.starts = torch.zeros(b, **long)  # [b]: where its request's entries start (rows - starts = steps done)
        self.live = torch.zeros(b, **long)  # [b]: 1 for a live row, 0 for padding
        self.live_mask = torch.zeros(b, *([1] * len(sample_shape)), dtype=torch.bool, device=device)
        self.labels = torch.zeros(b, **long) if conditional else None
        # guidance: the network's rows (src), labels (the null class at twins), each row's twin slot and scale
        self.src = torch.zeros(b, **long) if key.guided else None
        self.net_labels = torch.zeros(b, **long) if key.guided else None
        self.pair = torch.zeros(b, **long) if key.guided else None
        self.scale = torch.zeros(b, *([1] * len(sample_shape)), device=device) if key.guided else None
        self.seeds = torch.zeros(b, **long) if key.noise else None
        self.indices = torch.zeros(b, **long) if key.noise else None
        self.x0 = torch.zeros(b, *sample_shape, device=device) if key.keeps_x0 else None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.n = 0  # live rows

    def load(
        self,
        x: Tensor,
        rows: Tensor,
        starts: Tensor,
        labels: Tensor | None = None,
        seeds: Tensor | None = None,
        indices: Tensor | None = None,
        x0: Tensor | None = None,
        guidance: tuple[Tensor, Tensor, Tensor, Tensor] | None = None,
    ) -> None:
        """Put a batch of n <= key.rows rows into the buffers (the rest becomes padding): x [n, C, H,
        W], rows/starts/labels/seeds/indices [n] long, x0 [n, C, H, W] (a multistep sampler's
        previous x0; zeros where None); for a guided graph, guidance = (src, net_labels, pair,
        scale), each [key.rows] (scale [key.rows, 1, 1, 1]). A few copies on the current stream,
        no host sync."""
        n = x.shape[0]
        if n > self.key.rows:
            raise ValueError(f"{n} rows do not fit a graph of {self.key.rows}")
        if (guidance is not None) != self.key.guided:
            raise ValueError("guidance goes with a guided graph, and only there")
        self.n = n
        for buffer, values in (
            (self.x, x),
            (self.rows, rows),
            (self.starts, starts),
            (self.labels, labels),
            (self.seeds, seeds),
            (self.indices, indices),
            (self.x0, x0),
        ):
            if buffer is None:
                continue
            if values is None:
                buffer[:n].zero_()
            elif values.data_ptr() != buffer.data_ptr():  # (rows already in place need no copy)
                buffer[:n].copy_(values)
            buffer[n:].zero_()
        self.live.zero_()
        self.live[:n].fill_(1)
        self.live_mask.copy_(self.live.view_as(self.live_mask).bool())
        if guidance is not None:
            for buffer, values in zip((self.src, self.net_labels, self.pair, self.scale), guidance, strict=True):
                buffer.copy_(values)

    @property
    def recorded(self) -> bool:
        """Whether replay() is one launch already (on a CPU there is nothing to record)."""
        return self.graph is not None or self.device.type != "cuda"

    def record(self) -> None:
        """Record the step (CUDA): warm it up on scratch copies of the buffers, so that the live
        rows do not move, on a side stream as CUDA graphs require, then capture it on the real
        buffers. Raises what the capture raises (an op that cannot be recorded, no memory)."""
        if self.recorded:
            return
        scratch = StepGraph.__new__(StepGraph)
        scratch.__dict__.update(self.__dict__)
        for name, buffer in self.__dict__.items():
            if isinstance(buffer, Tensor):
                setattr(scratch, name, buffer.clone())
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(WARM_UP_RUNS):
                self._step(scratch)
        torch.cuda.current_stream(self.device).wait_stream(side)
        del scratch
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads' CUDA calls (waiting for images' copies) go on during capture
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._step(self)
        self.graph = graph

    def replay(self) -> None:
        """One step of every row: the recorded graph on CUDA (recorded on first use), the step
        itself elsewhere."""
        if self.device.type != "cuda":
            self._step(self)
            return
        self.record()
        self.graph.replay()
