"""Per-image, counter-based Gaussian noise.

Image i of a request with seed s must look the same whether it is generated alone, in a batch
of 64 or in a shard on another replica. A `torch.Generator` per image would give that, but
drawing from N generators is a Python loop over the batch at every denoising step. Instead the
noise is a pure function of (seed, index, draw, element): a 32-bit integer hash of those
counters (Wellons' "lowbias32" finaliser) gives uniforms, and Box-Muller turns each pair of
them into two standard normals. The whole batch is one vectorised expression, identical on CPU and
CUDA up to float32 round-off of log/cos, with no generator state to carry between steps.

`draw` numbers the calls within one trajectory: 0 is x_T, k >= 1 the noise of sampler step k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MAX_SEED = 2**63 - 1


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), without overflowing int64."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class ImageNoise:
    """The noise source of a batch of images, each keyed by its (seed, index).

    seeds, indices: [N] integers (seed in [0, 2**63), index >= 0). `draw(k, shape)` returns
    [N, *shape] standard normal noise that depends only on (seed_i, index_i, k).
    """

    def __init__(
        self,
        seeds: Sequence[int] | Tensor,
        indices: Sequence[int] | Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        seeds_t = torch.as_tensor(seeds, dtype=torch.int64).flatten()
        indices_t = torch.as_tensor(indices, dtype=torch.int64).flatten()
        if seeds_t.shape != indices_t.shape:
            raise ValueError(f"{seeds_t.numel()} seeds but {indices_t.numel()} indices")
        if seeds_t.numel() and (int(seeds_t.min()) < 0 or int(indices_t.min()) < 0):
            raise ValueError("seeds and indices must be non-negative")
        self.device = torch.device(device)
        seeds_t, indices_t = seeds_t.to(self.device), indices_t.to(self.device)
        # 1. fold the 64-bit seed and the index into one 32-bit key per image
        key = hash32(seeds_t & _MASK32)
        key = hash32(key ^ (seeds_t >> 32))
        key = hash32(key ^ (indices_t & _MASK32))
        self._keys = hash32(key ^ (indices_t >> 32))  # [N]
        self._counter_cache: dict[int, Tensor] = {}

    @classmethod
    def for_request(cls, seed: int, num_images: int, device: torch.device | str = "cpu") -> ImageNoise:
        """Images 0..num_images-1 of one request."""
        return cls([seed] * num_images, list(range(num_images)), device)

    def __len__(self) -> int:
        return self._keys.numel()

    def draw(self, k: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise [N, *shape] for draw number k of every image."""
        n_elem = math.prod(shape)
        pairs = (n_elem + 1) // 2  # Box-Muller turns 2 uniforms into 2 normals
        stream = hash32(self._keys ^ (k & _MASK32))[:, None]  # [N, 1]
        bits = hash32(stream ^ self._counters(2 * pairs)[None, :])  # [N, 2P] in [0, 2**32)
        # 24-bit uniforms strictly inside (0, 1): exact in float32, so log(u1) is finite
        u = ((bits >> 8).to(torch.float32) + 0.5) * 2.0**-24
        radius = torch.sqrt(-2.0 * torch.log(u[:, :pairs]))
        theta = (2.0 * math.pi) * u[:, pairs:]
        z = torch.cat([radius * torch.cos(theta), radius * torch.sin(theta)], dim=1)[:, :n_elem]
        return z.to(dtype).reshape(len(self), *shape)

    def _counters(self, n: int) -> Tensor:
        """hash32(0..n-1), the per-element part of the stream; the same for every key, so cached."""
        cached = self._counter_cache.get(n)
        if cached is None:
            cached = hash32(torch.arange(n, device=self.device, dtype=torch.int64))
            self._counter_cache[n] = cached
        return cached
