import math
import random

import numpy as np
import pytest
import torch

from undiffuse import ImageNoise
from undiffuse.noise import philox4x32


def test_noise_is_standard_normal():
    z = ImageNoise.for_request(123, 64).draw(1, (3, 32, 32))
    assert z.shape == (64, 3, 32, 32) and z.dtype == torch.float32
    n = z.numel()
    assert z.mean().item() == pytest.approx(0.0, abs=5 / math.sqrt(n))
    assert z.var().item() == pytest.approx(1.0, abs=0.01)
    # tails of a normal: P(|z| > 2) = 4.55 %, P(|z| > 3) = 0.27 %
    assert (z.abs() > 2).float().mean().item() == pytest.approx(0.0455, abs=0.002)
    assert (z.abs() > 3).float().mean().item() == pytest.approx(0.0027, abs=0.0005)


def test_streams_are_uncorrelated_across_images_draws_and_seeds():
    shape = (1, 64, 64)
    a = ImageNoise([7, 7, 8], [0, 1, 0])
    d1, d2 = a.draw(1, shape).flatten(1), a.draw(2, shape).flatten(1)
    pairs = [(d1[0], d1[1]), (d1[0], d1[2]), (d1[0], d2[0])]
    for u, v in pairs:
        corr = torch.corrcoef(torch.stack([u, v]))[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(u.numel())
    # neighbouring pixels of one image are independent too
    img = d1[0]
    corr = torch.corrcoef(torch.stack([img[:-1], img[1:]]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(img.numel())


def test_same_seed_and_index_give_the_same_noise_in_any_batch():
    alone = ImageNoise([42], [5]).draw(3, (1, 8, 8))
    batch = ImageNoise([1, 42, 42, 9], [5, 4, 5, 5]).draw(3, (1, 8, 8))
    assert torch.equal(alone[0], batch[2])
    assert not torch.equal(alone[0], batch[1])  # other index
    assert not torch.equal(alone[0], batch[3])  # other seed


def test_large_seeds_use_all_64_bits():
    a = ImageNoise([2**40 + 1], [0]).draw(0, (1, 4, 4))
    b = ImageNoise([1], [0]).draw(0, (1, 4, 4))
    assert not torch.equal(a, b)


def test_rejects_bad_keys():
    with pytest.raises(ValueError, match="2 seeds but 1 indices"):
        ImageNoise([1, 2], [0])
    with pytest.raises(ValueError, match="non-negative"):
        ImageNoise([-1], [0])


# --- Philox-4x32-10 ---------------------------------------------------------------------------

M0, M1, W0, W1, MASK32 = 0xD2511F53, 0xCD9E8D57, 0x9E3779B9, 0xBB67AE85, 0xFFFFFFFF


def philox4x32_10(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pure-Python reference, after Random123's philox4x32_R(10, ...): 10 rounds, the key bumped
    by (W0, W1) between rounds (9 bumps; a bump after the last round would not matter)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(10):
        if r:
            k0, k1 = (k0 + W0) & MASK32, (k1 + W1) & MASK32
        p0, p1 = M0 * c0, M1 * c2  # exact Python ints: (hi, lo) = (p >> 32, p & MASK32)
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32
    return c0, c1, c2, c3


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Random123 kat_vectors, philox4x32 10
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    assert philox4x32_10(counter, key) == expected
    got = philox4x32(tuple(torch.tensor([c]) for c in counter), tuple(torch.tensor([k]) for k in key))
    assert tuple(int(w) for w in got) == expected


def test_vectorised_philox_matches_the_reference():
    rng = random.Random(20110101)
    edge = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000, MASK32]
    cases = [(tuple(rng.choice(edge) for _ in range(4)), tuple(rng.choice(edge) for _ in range(2))) for _ in range(50)]
    cases += [
        (tuple(rng.getrandbits(32) for _ in range(4)), tuple(rng.getrandbits(32) for _ in range(2))) for _ in range(300)
    ]
    counters = torch.tensor([c for c, _ in cases]).T
    keys = torch.tensor([k for _, k in cases]).T
    got = torch.stack(philox4x32(tuple(counters), tuple(keys)), dim=1)
    assert got.dtype == torch.int64 and int(got.min()) >= 0 and int(got.max()) <= MASK32
    assert got.tolist() == [list(philox4x32_10(c, k)) for c, k in cases]


def reference_noise(seed: int, index: int, k: int, n_elem: int) -> torch.Tensor:
    """The module docstring's layout, spelled out one block at a time."""
    words = [
        philox4x32_10((b, k, index & MASK32, index >> 32), (seed & MASK32, seed >> 32))
        for b in range((n_elem + 3) // 4)
    ]
    u = ((torch.tensor(words) >> 8).to(torch.float32) + 0.5) * 2.0**-24  # [B, 4]
    out = []
    for a, b in ((0, 1), (2, 3)):
        radius, theta = torch.sqrt(-2.0 * torch.log(u[:, a])), (2.0 * math.pi) * u[:, b]
        out += [radius * torch.cos(theta), radius * torch.sin(theta)]
    return torch.stack(out, dim=1).flatten()[:n_elem]  # z[4b + j] = out[j][b]


def test_draw_follows_the_documented_key_and_counter_layout():
    seeds, indices = [0, 7, 2**40 + 3, 2**63 - 1], [0, 5, 2**33 + 9, 2**63 - 1]
    noise = ImageNoise(seeds, indices)
    for k in (0, 1, 2**32 - 1):
        z = noise.draw(k, (3, 5))  # 15 elements: the last block is cut short
        for row, (s, i) in enumerate(zip(seeds, indices, strict=True)):
            assert torch.allclose(z[row].flatten(), reference_noise(s, i, k, 15), rtol=0, atol=1e-6)


def test_a_smaller_shape_sees_a_prefix_of_the_stream():
    noise = ImageNoise([1, 2], [3, 4])
    big, small = noise.draw(2, (3, 7)).flatten(1), noise.draw(2, (10,))
    assert torch.equal(big[:, :10], small)


def test_the_old_cross_seed_collision_is_gone():
    i = torch.arange(1024)
    a = ImageNoise(torch.full((1024,), 18373), i).draw(0, (1, 4, 4))
    b = ImageNoise(torch.full((1024,), 11935), i ^ 46).draw(0, (1, 4, 4))
    assert not (a == b).flatten(1).all(dim=1).any()


def count_distinct_pairs(a: np.ndarray, b: np.ndarray) -> int:
    """How many distinct (a[i], b[i]) pairs: sort lexicographically, count the changes."""
    order = np.lexsort((b, a))
    a, b = a[order], b[order]
    return 1 + int(np.count_nonzero((a[1:] != a[:-1]) | (b[1:] != b[:-1])))


def test_no_two_seed_index_pairs_share_a_stream():
    g = torch.Generator().manual_seed(0)
    n_random = 1_000_000
    i = torch.arange(1024)
    # the old hash's colliding pairs (18373, i) ~ (11935, i ^ 46), then random keys
    seeds = torch.cat(
        [torch.full((1024,), 18373), torch.full((1024,), 11935), torch.randint(0, 2**63 - 1, (n_random,), generator=g)]
    )
    indices = torch.cat([i, i ^ 46, torch.randint(0, 2**20, (n_random,), generator=g)])
    n = seeds.numel()
    assert count_distinct_pairs(seeds.numpy(), indices.numpy()) == n  # distinct inputs
    # a stream's fingerprint: the 4 words of draw 0, block 0 in the documented layout, as 2 x 64 bits
    zero = torch.zeros(1, dtype=torch.int64)
    words = philox4x32((zero, zero, indices & MASK32, indices >> 32), (seeds & MASK32, seeds >> 32))
    w = [x.numpy().astype(np.uint64) for x in words]
    assert count_distinct_pairs((w[0] << np.uint64(32)) | w[1], (w[2] << np.uint64(32)) | w[3]) == n


def test_draw_rows_with_mixed_draw_numbers_matches_draw_row_by_row():
    noise = ImageNoise([3, 3, 9, 2**50, 3], [0, 1, 0, 7, 4])
    ks = [0, 5, 1, 2**32 - 1, 5]
    shape = (2, 3, 3)
    mixed = noise.draw_rows(torch.tensor(ks), shape)
    assert mixed.shape == (5, *shape) and mixed.dtype == torch.float32
    for row, k in enumerate(ks):
        assert torch.equal(mixed[row], noise.draw(k, shape)[row])
    assert torch.equal(noise.draw_rows(ks, shape, torch.float64), mixed.double())  # a list works too
    assert torch.equal(noise.draw_rows([4] * 5, shape), noise.draw(4, shape))


def test_select_gives_the_rows_of_the_full_batch():
    full = ImageNoise([3, 3, 9, 2**50, 3], [0, 1, 0, 7, 4])
    z = full.draw(2, (1, 4, 4))
    for rows in ([4, 0], [2, 2, 1], torch.tensor([3]), torch.tensor([True, False, True, False, True])):
        sub = full.select(rows)
        assert len(sub) == len(z[rows])
        assert torch.equal(sub.draw(2, (1, 4, 4)), z[rows])
    empty = full.select([])
    assert len(empty) == 0 and empty.draw(1, (1, 2, 2)).shape == (0, 1, 2, 2)
    again = full.select([4, 1, 0]).select([2, 0])  # a sub-batch of a sub-batch
    assert torch.equal(again.seeds, torch.tensor([3, 3])) and torch.equal(again.indices, torch.tensor([0, 4]))
    # a batch rebuilt from the keys of its parts (an engine admitting rows) draws the same noise
    merged = ImageNoise(
        torch.cat([full.select([0]).seeds, full.select([3]).seeds]), torch.cat([full.indices[:1], full.indices[3:4]])
    )
    assert torch.equal(merged.draw(2, (1, 4, 4)), z[[0, 3]])


def test_dtype_and_device_behaviour():
    noise = ImageNoise.for_request(5, 3)
    z = noise.draw(1, (1, 6, 6))
    assert z.device == noise.device == torch.device("cpu") and z.dtype == torch.float32
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        zd = noise.draw(1, (1, 6, 6), dtype)
        assert zd.dtype == dtype and zd.shape == (3, 1, 6, 6)
        assert torch.equal(zd, z.to(dtype))  # computed in float32, then cast
        assert torch.equal(noise.draw_rows([1, 1, 1], (1, 6, 6), dtype), zd)
    assert noise.seeds.device == noise.indices.device == noise.device


@pytest.mark.gpu
def test_draw_rows_and_select_on_cuda_match_cpu():
    cpu = ImageNoise([5, 5, 2**62], [0, 7, 3])
    gpu = ImageNoise([5, 5, 2**62], [0, 7, 3], device="cuda")
    ks = [1, 0, 2**32 - 1]
    assert torch.allclose(
        cpu.draw_rows(ks, (1, 28, 28)), gpu.draw_rows(torch.tensor(ks, device="cuda"), (1, 28, 28)).cpu(), atol=1e-5
    )
    sub = gpu.select(torch.tensor([2, 0], device="cuda"))
    assert sub.device.type == "cuda" and sub.draw(3, (4,)).device.type == "cuda"
    assert torch.allclose(sub.draw(3, (4,)).cpu(), cpu.draw(3, (4,))[[2, 0]], atol=1e-5)


def test_rejects_out_of_range_keys_and_draws():
    for seeds, indices in (([2**63], [0]), ([0], [2**63]), ([2**64 + 1], [0]), ([0], [-(2**63) - 1])):
        with pytest.raises(ValueError, match="must be non-negative and below 2"):
            ImageNoise(seeds, indices)
    with pytest.raises(ValueError, match="non-negative"):
        ImageNoise(torch.tensor([2**63 + 1], dtype=torch.uint64), torch.tensor([0]))
    ImageNoise([2**63 - 1], [2**63 - 1])  # the largest accepted keys
    noise = ImageNoise.for_request(0, 2)
    for k in (-1, 2**32):
        with pytest.raises(ValueError, match="draw number"):
            noise.draw(k, (1, 2, 2))
        with pytest.raises(ValueError, match="draw numbers"):
            noise.draw_rows([0, k], (1, 2, 2))
    with pytest.raises(ValueError, match="3 draw numbers for 2 images"):
        noise.draw_rows([0, 1, 2], (1, 2, 2))


def test_one_batched_draw_equals_each_requests_own_draws_bit_for_bit():
    """`for_requests` keys many requests' images in one batch (what the engine draws every
    joining row's x_T with): its draws equal each request's own ImageNoise, row for row and bit
    for bit, for x_T, for later draws and for per-row draw numbers, including 64-bit seeds and
    indices."""
    requests = [(7, 0, 3), (2**63 - 1, 2**40, 2), (7, 3, 1), (0, 2**63 - 4, 4), (123, 10, 5)]
    seeds, starts, counts = zip(*requests, strict=True)
    batch = ImageNoise.for_requests(seeds, starts, counts)
    own = [ImageNoise([s] * n, range(a, a + n)) for s, a, n in requests]
    assert len(batch) == sum(counts)
    assert torch.equal(batch.seeds, torch.cat([o.seeds for o in own]))
    assert torch.equal(batch.indices, torch.cat([o.indices for o in own]))
    shape = (3, 5, 7)  # 105 elements: not a whole number of Philox blocks
    for k in (0, 1, 2**32 - 1):
        assert torch.equal(batch.draw(k, shape), torch.cat([o.draw(k, shape) for o in own]))
    ks = torch.tensor([(i * 7) % 50 for i in range(len(batch))])
    got = batch.draw_rows(ks, shape)
    begin = 0
    for o in own:
        part = ks[begin : begin + len(o)]
        assert torch.equal(got[begin : begin + len(o)], o.draw_rows(part, shape))
        begin += len(o)


def test_for_requests_refuses_keys_outside_the_range():
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        ImageNoise.for_requests([-1], [0], [1])
    with pytest.raises(ValueError, match="below 2\\*\\*63"):
        ImageNoise.for_requests([1], [2**63 - 1], [2])
    with pytest.raises(ValueError, match="counts"):
        ImageNoise.for_requests([1, 2], [0], [1])
    assert len(ImageNoise.for_requests([], [], [])) == 0


@pytest.mark.slow
@pytest.mark.compiles
def test_compiled_draws_are_row_for_row_the_same_whatever_the_batch_and_near_the_eager_ones():
    """An engine that compiles draws through `compiled_normals`: a row's noise is the same in any
    sub-batch (so batching changes no image), and within 1e-6 of the eager draw (the compiled log
    and cosine may round differently)."""
    noise = ImageNoise.for_requests([5, 9, 11], [0, 100, 7], [3, 5, 9]).with_compiled_draws()
    ks = torch.arange(17) % 5 + 1
    for shape in [(1, 8, 8), (3, 7, 5)]:
        full = noise.draw_rows(ks, shape)
        for rows in ([0], [4, 5], list(range(3, 12)), [16]):
            assert torch.equal(noise.select(rows).draw_rows(ks[rows], shape), full[rows]), (shape, rows)
        eager = ImageNoise.for_requests([5, 9, 11], [0, 100, 7], [3, 5, 9]).draw_rows(ks, shape)
        assert torch.allclose(full, eager, rtol=0, atol=1e-6)
        assert torch.equal(noise.draw(2, shape), noise.draw_rows(torch.full((17,), 2), shape))
