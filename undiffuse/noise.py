"""Per-image, counter-based Gaussian noise.

Image i of a request with seed s must look the same whether it is generated alone, in a batch
of 64 or in a shard on another replica. A `torch.Generator` per image would give that, but
drawing from N generators is a Python loop over the batch at every denoising step. Instead the
noise is a pure function of (seed, index, draw, element), computed with the Philox-4x32-10
counter-based generator (Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as
1, 2, 3", SC 2011; the Random123 library). Philox maps a 128-bit counter and a 64-bit key to
128 random bits through 10 rounds of 32x32->64-bit multiplies and xors; for a fixed key it is a
bijection of the counter. The layout used here:

    key     = (seed mod 2**32, seed >> 32)                    seed in [0, 2**63)
    counter = (block, draw, index mod 2**32, index >> 32)     index in [0, 2**63), draw in [0, 2**32)

`draw` numbers the calls within one trajectory: 0 is x_T, k >= 1 the noise of sampler step k.
`block` numbers the groups of 4 output words within one draw of one image. Each block's words
(w0, w1, w2, w3) become 24-bit uniforms strictly inside (0, 1), u = ((w >> 8) + 0.5) * 2**-24
(exact in float32, so log(u) is finite), and Box-Muller turns the pairs (w0, w1) and (w2, w3)
into four standard normals:

    z[4b + 0] = r01 * cos(t01),  z[4b + 1] = r01 * sin(t01)     r01 = sqrt(-2 log u0), t01 = 2 pi u1
    z[4b + 2] = r23 * cos(t23),  z[4b + 3] = r23 * sin(t23)     r23 = sqrt(-2 log u2), t23 = 2 pi u3

Element e of an image's noise (flattened in C order) is z[e]: the first prod(shape) normals of
the stream, so a smaller shape sees a prefix of a larger one.

Distinct (seed, index, draw, block) never share a (key, counter) pair: images of one seed differ
in the counter, where Philox is a bijection, and different seeds are different keys. The whole
seed is the key on purpose. An earlier release folded (seed, index) into a 32-bit key with an
integer hash, and 32 bits collide across seeds: seed 18373 image i got exactly the noise of seed
11935 image i XOR 46, for every i < 1024. So the images a given (seed, index) produces changed
once, with the switch to Philox; they are now fixed by the layout above.

The whole batch is one vectorised expression over [N images x blocks] on int64 tensors (torch
has no uint32 arithmetic that is reliable on every device), identical on CPU and CUDA up to
float32 round-off of log/cos, with no generator state to carry between steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from undiffuse.compiled import allow_recompiles

_MASK32 = 0xFFFFFFFF
_ROUNDS = 10
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # Weyl key increments between rounds
_RANGE_ERROR = "seeds and indices must be non-negative and below 2**63"


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of m * x for a constant m and int64 x in [0, 2**32).

    m * x needs 64 bits unsigned, more than int64 holds, so m is split into 16-bit halves:
    m * x = (x * m_hi) * 2**16 + x * m_lo, and no intermediate exceeds 2**49. In-place ops on
    the fresh temporaries: this is most of the cost of a draw on CPU.
    """
    p = x * (m & 0xFFFF)  # < 2**48
    t = x * (m >> 16)
    t += p >> 16  # (m * x) >> 16, < 2**49
    hi = t >> 16
    t &= 0xFFFF
    t <<= 16
    p &= 0xFFFF
    t |= p  # lo = ((m * x) >> 16 mod 2**16) * 2**16 + (m * x mod 2**16)
    return hi, t


def philox4x32(
    counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox-4x32-10 block function on int64 tensors holding 32-bit words in [0, 2**32).

    The six inputs broadcast against each other; returns the 4 output words, broadcast shape.
    Round (Random123's `_philox4x32round`): (hi0, lo0) = M0 * c0, (hi1, lo1) = M1 * c2,
    c = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0); the key is bumped by (W0, W1) mod 2**32
    between rounds, so round r uses key + r * (W0, W1).
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(_ROUNDS):
        if r:
            k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _to_device(values: Tensor, device: torch.device) -> Tensor:
    """A host tensor on a CUDA device without waiting for the device (pinned, asynchronous)."""
    if device.type == "cuda" and values.device.type == "cpu":
        return values.pin_memory().to(device, non_blocking=True)
    return values.to(device)


def _as_keys(values: Sequence[int] | Tensor) -> Tensor:
    """[N] int64 tensor of seeds or indices, rejecting anything outside [0, 2**63)."""
    if isinstance(values, Tensor):  # uint64 values >= 2**63 wrap negative and fail the sign check
        return values.to(torch.int64).flatten()
    try:
        return torch.as_tensor(values, dtype=torch.int64).flatten()
    except (ValueError, OverflowError, RuntimeError) as e:  # a Python int outside int64
        if "overflow" in str(e).lower():
            raise ValueError(_RANGE_ERROR) from None
        raise


class ImageNoise:
    """The noise source of a batch of images, each keyed by its (seed, index).

    seeds, indices: [N] integers in [0, 2**63). `draw(k, shape)` returns [N, *shape] standard
    normal noise that depends only on (seed_i, index_i, k); `draw_rows(ks, shape)` gives each
    row its own draw number; `select(rows)` is the noise of a sub-batch (see the module
    docstring for the exact function).
    """

    def __init__(
        self,
        seeds: Sequence[int] | Tensor,
        indices: Sequence[int] | Tensor,
        device: torch.device | str = "cpu",
    ) -> None:
        seeds_t, indices_t = _as_keys(seeds), _as_keys(indices)
        if seeds_t.shape != indices_t.shape:
            raise ValueError(f"{seeds_t.numel()} seeds but {indices_t.numel()} indices")
        if seeds_t.numel() and (int(seeds_t.min()) < 0 or int(indices_t.min()) < 0):
            raise ValueError(_RANGE_ERROR)
        self._set(seeds_t, indices_t, torch.device(device))

    def _set(self, seeds: Tensor, indices: Tensor, device: torch.device, compiled: bool = False) -> None:
        self.device = device
        self.compiled = compiled  # draws through the compiled draw (`compiled_normals`)
        self._seeds, self._indices = _to_device(seeds, device), _to_device(indices, device)  # [N] int64, checked

    @classmethod
    def for_request(cls, seed: int, num_images: int, device: torch.device | str = "cpu") -> ImageNoise:
        """Images 0..num_images-1 of one request."""
        return cls([seed] * num_images, list(range(num_images)), device)

    @classmethod
    def for_requests(
        cls,
        seeds: Sequence[int],
        starts: Sequence[int],
        counts: Sequence[int],
        device: torch.device | str = "cpu",
    ) -> ImageNoise:
        """The images of many requests in one batch: request j's images are (seeds[j], starts[j]
        + i) for i < counts[j], one after the other. Row for row the same keys as
        `ImageNoise([s] * n, range(start, start + n))` per request, so a draw over the batch
        equals the requests' own draws bit for bit; built with a fixed number of tensor ops
        whatever the number of requests (the keys are checked on the host, per request)."""
        if not len(seeds) == len(starts) == len(counts):
            raise ValueError(f"{len(seeds)} seeds, {len(starts)} starts and {len(counts)} counts")
        if len(seeds) and (
            min(seeds) < 0
            or max(seeds) >= 2**63
            or min(starts) < 0
            or min(counts) < 0
            or max(a + n for a, n in zip(starts, counts, strict=True)) > 2**63
        ):
            raise ValueError(_RANGE_ERROR)
        n = torch.tensor(counts, dtype=torch.int64)
        total = int(sum(counts))
        first = torch.tensor(starts, dtype=torch.int64) - (torch.cumsum(n, 0) - n)  # start less the rows before
        rows_seeds = torch.tensor(seeds, dtype=torch.int64).repeat_interleave(n, output_size=total)
        rows_indices = first.repeat_interleave(n, output_size=total) + torch.arange(total, dtype=torch.int64)
        out = cls.__new__(cls)
        out._set(rows_seeds, rows_indices, torch.device(device))
        return out

    def __len__(self) -> int:
        return self._seeds.numel()

    @property
    def seeds(self) -> Tensor:
        """[N] int64 seeds, on `device`."""
        return self._seeds

    @property
    def indices(self) -> Tensor:
        """[N] int64 image indices, on `device`."""
        return self._indices

    def select(self, rows: Tensor | Sequence[int]) -> ImageNoise:
        """The noise of a sub-batch: row j of the result is row rows[j] of this batch.

        rows: integer positions (repeats and reordering allowed) or an [N] bool mask. No
        re-validation or host sync: the keys are already checked. To grow a batch (a
        continuous-batching engine admitting requests), build a new ImageNoise from
        torch.cat of the `seeds` / `indices` of its parts.
        """
        rows_t = torch.as_tensor(rows, device=self.device)
        if rows_t.dtype != torch.bool:
            rows_t = rows_t.to(torch.int64)
        out = ImageNoise.__new__(ImageNoise)
        out._set(self._seeds[rows_t], self._indices[rows_t], self.device, self.compiled)
        return out

    def with_compiled_draws(self) -> ImageNoise:
        """The same keys, drawn through the compiled draw (`compiled_normals`): what an engine that
        compiles draws. Its normals may differ from the eager draw's by an ulp (the compiled
        log and cosine); row for row they are the same whatever the batch."""
        out = ImageNoise.__new__(ImageNoise)
        out._set(self._seeds, self._indices, self.device, compiled=True)
        return out

    def draw(self, k: int, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise [N, *shape] for draw number k (in [0, 2**32)) of every image."""
        if not 0 <= k <= _MASK32:
            raise ValueError(f"draw number {k} is outside [0, 2**32)")
        return self._normals(torch.full((1, 1), k, dtype=torch.int64, device=self.device), shape, dtype)

    def draw_rows(self, ks: Tensor | Sequence[int], shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
        """Standard normal noise [N, *shape] where row i is draw number ks[i] of image i.

        For a batch whose rows are at different steps (continuous batching); row i equals
        `draw(ks[i], shape)[i]`. ks: [N] integers in [0, 2**32). They are range-checked when
        given as a list or a CPU tensor; a tensor already on an accelerator is trusted, as
        checking it would cost a host sync at every step.
        """
        ks_t = torch.as_tensor(ks).to(torch.int64)
        if ks_t.shape != (len(self),):
            raise ValueError(f"{ks_t.numel()} draw numbers for {len(self)} images")
        if ks_t.device.type == "cpu" and ks_t.numel() and (int(ks_t.min()) < 0 or int(ks_t.max()) > _MASK32):
            raise ValueError("draw numbers must be in [0, 2**32)")
        return self._normals(ks_t.to(self.device)[:, None], shape, dtype)

    def _normals(self, draws: Tensor, shape: Sequence[int], dtype: torch.dtype) -> Tensor:
        """draws: [N, 1] or [1, 1] int64 draw numbers -> [N, *shape] normals."""
        n_elem = math.prod(shape)
        if (n_elem + 3) // 4 > _MASK32 + 1:  # 4 normals per Philox block
            raise ValueError(f"{n_elem} elements per image exceed the 2**34 one draw can hold")
        fn = compiled_normals() if self.compiled else normals
        return fn(self._seeds, self._indices, draws, tuple(shape), dtype)


def normals(seeds: Tensor, indices: Tensor, draws: Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """[N, *shape] standard normals of the images keyed (seeds[i], indices[i]) ([N] int64), draw
    number draws[i] ([N, 1] or [1, 1] int64): Philox-4x32-10, then Box-Muller (module docstring)."""
    n_elem = math.prod(shape)
    blocks = (n_elem + 3) // 4  # 4 normals per Philox block
    block = torch.arange(blocks, dtype=torch.int64, device=seeds.device)[None, :]  # [1, B]
    seeds, indices = seeds[:, None], indices[:, None]  # [N, 1]
    key = (seeds & _MASK32, seeds >> 32)
    w = philox4x32((block, draws, indices & _MASK32, indices >> 32), key)  # 4 x [N, B]
    # 24-bit uniforms strictly inside (0, 1): exact in float32, so log(u) is finite
    u = ((torch.stack(w, dim=-1) >> 8).to(torch.float32) + 0.5) * 2.0**-24  # [N, B, 4]
    radius = torch.sqrt(-2.0 * torch.log(u[..., 0::2]))  # from w0, w2: [N, B, 2]
    theta = (2.0 * math.pi) * u[..., 1::2]  # from w1, w3
    z = torch.stack([radius * torch.cos(theta), radius * torch.sin(theta)], dim=-1)  # [N, B, 2, 2]
    n = seeds.shape[0]
    return z.reshape(n, 4 * blocks)[:, :n_elem].to(dtype).reshape(n, *shape)


_compiled_normals: Callable[..., Tensor] | None = None


def compiled_normals() -> Callable[..., Tensor]:
    """`normals` compiled with torch.compile: the ~290 small integer and float ops of a draw in
    one fused kernel. Shared by the process's engines and samplers, so that their draws agree."""
    global _compiled_normals
    if _compiled_normals is None:
        allow_recompiles(32)  # a graph per image shape, dtype and kind of draw numbers
        _compiled_normals = torch.compile(normals)
    return _compiled_normals
