"""bench/engine.py's rows (8) and (9): the models they build are the sizes they claim (counted on
the meta device, nothing allocated), and the tiny ones run through the engine to images of the
right shape. No timings: the benchmark measures, the tests check that it measures the right thing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.engine import dit_xl_2, latent_model, model_costs, pixel_model, unet_256
from undiffuse.engine import DenoisingEngine, EngineConfig, Request

pytestmark = pytest.mark.slow  # builds diffusers models (the real ones on the meta device): seconds on 2 cores


def test_the_real_sizes_are_the_published_architectures():
    costs = model_costs("real")
    assert costs["unet_params"] == pytest.approx(113.67, abs=0.01)  # google/ddpm-church-256
    # DiT-XL/2: 675 M in the paper; diffusers gives each of its 28 blocks its own copy of the
    # timestep and class embeddings (2.78 M each), as its converted checkpoint holds them
    assert costs["dit_params"] == pytest.approx(674.83 + 27 * 2.777, abs=0.05)
    assert costs["dit_gflop"] == pytest.approx(237.3, abs=0.1)  # per image and network call
    assert costs["decoder_params"] == pytest.approx(49.5, abs=0.1)  # Stable Diffusion's VAE decoder
    assert costs["unet_gflop"] > 400 and costs["decode_gflop"] > 500


@pytest.mark.parametrize("which", ["unet", "dit"])
def test_a_tiny_row_runs_through_the_engine_to_images(which):
    if which == "unet":
        model = pixel_model(unet_256("tiny", "cpu"))
        request = Request("r", "o", seed=0, start=0, count=2, steps=1)
    else:
        model = latent_model(*dit_xl_2("tiny", "cpu"))
        request = Request("r", "o", seed=0, start=0, count=2, steps=1, labels=[3, 999], guidance_scale=4.0)
    assert model.image_shape == (3, 64, 64)
    assert model.sample_shape == ((3, 64, 64) if which == "unet" else (4, 8, 8))
    engine = DenoisingEngine(model, EngineConfig(max_batch=4, compile=False, keep_samples=True))
    engine.add(request)
    (done,) = engine.step()
    assert engine.idle
    assert done.samples.shape == (2, 3, 64, 64) and torch.isfinite(done.samples).all()
    pixels = done.pixels()
    assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == np.uint8
