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
and a latent decoder on slices of a fixed size: every row goes through the same kernels in the
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

from undiffuse.samplers import NULL_CLASS

CPU_ROWS = 8
"""Rows per network call on a CPU: 16 and 32 are a little faster per row at large batches, 8
costs a lone image less (docs/benchmarks.md, bench/invariance.py)."""

NetworkCall = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def default_rows(device: torch.device | str) -> int:
    """The rows per network call where nothing says otherwise: CPU_ROWS on a CPU, 0 (whole
    batches) elsewhere."""
    return CPU_ROWS if torch.device(device).type == "cpu" else 0


def in_slices(call: NetworkCall, x: Tensor, t: Tensor, labels: Tensor | None, rows: int) -> Tensor:
    """call(x, t, labels) on slices of exactly `rows` rows, the last padded (x and t zeros, labels
    NULL_CLASS), concatenated and cut back to x's N rows. x: [N, ...]; t: [N]; labels: [N] or None.
    rows = 0: one call on the whole batch."""
    n = x.shape[0]
    if rows <= 0 or n == 0:
        return call(x, t, labels)
    pad = -n % rows
    if pad:
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        t = torch.cat([t, t.new_zeros(pad)])
        labels = None if labels is None else torch.cat([labels, labels.new_full((pad,), NULL_CLASS)])
    outs = [
        call(x[i : i + rows], t[i : i + rows], None if labels is None else labels[i : i + rows])
        for i in range(0, n + pad, rows)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out[:n] if pad else out


def decode_in_slices(decode: Callable[[Tensor], Tensor], x: Tensor, rows: int) -> Tensor:
    """decode(x) on slices of exactly `rows` latents, the last padded with zeros; [N, ...] ->
    [N, ...]. A decoder's work per image (at image size) is large enough that one image per
    call (rows = 1) costs little."""
    return in_slices(lambda latents, _t, _labels: decode(latents), x, x.new_zeros(x.shape[0]), None, rows)
