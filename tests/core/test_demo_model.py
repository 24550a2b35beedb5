"""The committed demo model: it loads, has the declared shape and range, and a digit of a
requested class is that digit (judged by a nearest-neighbour classifier on real MNIST)."""

from pathlib import Path

import pytest
import torch

from undiffuse import DDIMSampler, ImageNoise, load_model
from undiffuse.data import load_idx_dataset

pytestmark = pytest.mark.slow  # seconds per test on 2 cores: not in the fast tier

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "mnist"
MNIST = ROOT.parent / "shared" / "datasets" / "mnist"


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


@pytest.fixture(scope="module")
def samples(model):
    labels = torch.arange(10).repeat_interleave(10)
    x = DDIMSampler(model.schedule).sample(
        model.eps, model.image_shape, steps=50, noise=ImageNoise.for_request(0, 100), class_labels=labels
    )
    return x, labels


def test_declared_shape_and_range(model, samples):
    assert (model.image_size, model.channels, model.num_classes) == (28, 1, 10)
    assert model.class_names == tuple(str(i) for i in range(10))
    assert model.guidance_interval == (0.28, 5.42)  # docs/quality.md: guidance in a limited interval
    x, _ = samples
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x.std() > 0.3  # not a blank image


@pytest.mark.skipif(not MNIST.is_dir(), reason="the shared MNIST copy is not beside this checkout")
def test_requested_class_is_drawn(samples):
    images, labels = load_idx_dataset(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    # sanity: 5-NN on raw pixels classifies real MNIST digits well (leave-one-out on 1000)
    x, wanted = samples
    flat = images.flatten(1)

    def knn(queries: torch.Tensor, exclude_self: bool = False) -> torch.Tensor:
        d = torch.cdist(queries.flatten(1), flat)
        if exclude_self:
            d[torch.arange(len(queries)), torch.arange(len(queries))] = float("inf")
        votes = labels[d.topk(5, largest=False).indices]
        return votes.mode(dim=1).values

    assert (knn(images[:1000], exclude_self=True) == labels[:1000]).float().mean() > 0.9
    accuracy = (knn(x) == wanted).float().mean().item()
    assert accuracy >= 0.8, f"only {accuracy:.0%} of generated digits are the requested class"


@pytest.mark.skipif(not MNIST.is_dir(), reason="the shared MNIST copy is not beside this checkout")
def test_guidance_makes_the_requested_class_more_likely_not_less(model, samples):
    """Regression: DDIM with a clipped x0 beside the raw (guided) eps drew mostly wrong digits at
    guidance 2-3 (10% right at 3). With the eps the clipped x0 implies, guidance helps."""
    images, labels = load_idx_dataset(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    flat = images.flatten(1)

    def accuracy(x: torch.Tensor, wanted: torch.Tensor) -> float:
        votes = labels[torch.cdist(x.flatten(1), flat).topk(5, largest=False).indices]
        return (votes.mode(dim=1).values == wanted).float().mean().item()

    x, wanted = samples
    guided = DDIMSampler(model.schedule).sample(
        model.eps, model.image_shape, steps=20, noise=ImageNoise.for_request(0, 100), class_labels=wanted,
        guidance_scale=3.0, guidance_interval=model.guidance_interval,
    )  # fmt: skip
    assert accuracy(guided, wanted) >= max(0.9, accuracy(x, wanted))
