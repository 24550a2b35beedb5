import math

import pytest
import torch

from undiffuse import ImageNoise


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
