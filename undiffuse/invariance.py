"""Batch-invariant network calls: a row's output does not depend on the rest of its batch.

The README promises that image i of a job depends only on (seed, i). A step's arithmetic is
row-wise, but a network's kernels are not batch-invariant: the convolution and matrix-multiply
libraries pick an algorithm, and with it the order of their floating-point sums, from the shape
of the call, batch size included. On an x86 CPU with PyTorch 2.13 (oneDNN, MKL), a row of the
demo model computes one way alone, another in a batch of 2 or 3, and a third in a batch of 4 or
more (up to 2e-6 apart: after rounding to 8 bits, about 1 seed in 40 gets a PNG that differs by
a level somewhere); diffusers' UNet2DModel and DiT transformer do the same, and their latent
decoders compute one way alone and another in batches. At a fixed batch size, a row's result
depends neither on its neighbours nor on its place in the batch (tests/core/test_invariance.py
checks both).

So with `rows` = R > 0 the network is called on slices of exactly R rows, the last one padded,
and a latent decoder on one image at a time: every row goes through the same kernels in the
same order whatever it is batched with, and its bytes are the same. Slicing is not free: a lone
image pays for R rows (docs/benchmarks.md measures both ends). R = 0 calls the network on the
whole batch, as large as the step is: rows then agree across batches to about 1e-6, not bit for
bit. A CPU defaults to R = CPU_ROWS; a GPU to 0 until its cost is measured there
(bench/gpu_checks.sh), and UNDIFFUSE_INVARIANT_ROWS sets it for the service.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

CPU_ROWS = 16
"""Rows per network call on a CPU: the smallest slice that costs a full engine no more than 10 %
against whole batches (0.94x its images/s with the demo model); 8 costs a lone image half as much
but a full engine 17 % (docs/benchmarks.md, "Batch invariance")."""

NetworkCall = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def default_rows(device: torch.device | str) -> int:
    """The rows per network call where nothing says otherwise: CPU_ROWS on a CPU, 0 (whole
    batches) elsewhere."""
    return CPU_ROWS if torch.device(device).type == "cpu" else 0


def pad_rows(x: Tensor, t: Tensor, labels: Tensor | None, pad: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """x [N, ...], t [N] and labels [N] (or None) with `pad` copies of their last row appended:
    inputs the network takes for any model (a zero timestep or a "no class" label need not be
    valid for it), whose outputs are cut off; x keeps its memory format (channels_last)."""
    if pad <= 0:
        return x, t, labels
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    x = torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.cat([t, t[-1:].expand(pad)])
    labels = None if labels is None else torch.cat([labels, labels[-1:].expand(pad)])
    return x, t, labels


def in_slices(call: NetworkCall, x: Tensor, t: Tensor, labels: Tensor | None, rows: int) -> Tensor:
    """call(x, t, labels) on slices of exactly `rows` rows, the last padded with copies of the last
    row (`pad_rows`), and cut back to x's N rows. x: [N, ...]; t: [N]; labels: [N] or None.
    rows = 0: one call on the whole batch. Each slice's output is copied out before the next call
    (a compiled network's CUDA graph overwrites its output buffer when it replays)."""
    n = x.shape[0]
    if rows <= 0 or n == 0:
        return call(x, t, labels)
    pad = -n % rows
    x, t, labels = pad_rows(x, t, labels, pad)
    first = call(x[:rows], t[:rows], None if labels is None else labels[:rows])
    if n + pad == rows:
        return first[:n] if pad else first
    out = first.new_empty(n + pad, *first.shape[1:])
    out[:rows].copy_(first)
    for i in range(rows, n + pad, rows):
        out[i : i + rows].copy_(
            call(x[i : i + rows], t[i : i + rows], None if labels is None else labels[i : i + rows])
        )
    return out[:n] if pad else out


def decode_in_slices(decode: Callable[[Tensor], Tensor], x: Tensor, rows: int) -> Tensor:
    """decode(x) on slices of exactly `rows` latents (`in_slices`); [N, ...] -> [N, ...]. A
    decoder's work per image (at image size) is large enough that one image per call (rows = 1,
    what batch-invariant decoding uses) costs little."""
    return in_slices(lambda latents, _t, _labels: decode(latents), x, x.new_zeros(x.shape[0]), None, rows)
