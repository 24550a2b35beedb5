"""Model folders people bring, loaded as diffusers saved them: the schedule, prediction type and
x̂₀ clipping their scheduler says are what undiffuse samples with (checked step for step against
diffusers on the same model output), and weights that are not whole are caught when the folder
is listed. Tiny random-weight networks made here; nothing is downloaded."""

from __future__ import annotations

import diffusers  # a test dependency (requirements.lock)
import pytest
import torch

from undiffuse import NoiseSchedule, load_model
from undiffuse.config import CheckpointError, ScheduleConfig, check_weights, read_model_folder
from undiffuse.registry import make_sampler
from undiffuse.samplers import previous_timesteps


def _tiny_unet(**extra) -> diffusers.UNet2DModel:
    """A tiny diffusers UNet2DModel (8x8 RGB); extra: more of its arguments (num_class_embeds)."""
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **extra,
    ).eval()


def _pipeline(folder, scheduler) -> diffusers.DDIMPipeline:
    pipe = diffusers.DDIMPipeline(unet=_tiny_unet(), scheduler=scheduler)
    pipe.save_pretrained(folder)
    return pipe


def test_scaled_linear_matches_diffusers():
    theirs = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195)
    ours = NoiseSchedule.from_config(ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0195))
    assert torch.allclose(ours.betas.float(), theirs.betas, rtol=1e-5, atol=1e-8)
    assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip", [True, False])
def test_a_saved_pipeline_samples_as_its_scheduler_says(tmp_path, prediction, clip):
    """A DDIM pipeline saved by diffusers, loaded by folder: one DDIM step of ours equals
    diffusers' step on the same network output, for each prediction type and clip setting."""
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.0015,
        beta_end=0.0195,
        prediction_type=prediction,
        clip_sample=clip,
        set_alpha_to_one=False,
    )
    pipe = _pipeline(tmp_path / "pipe", scheduler)
    model = load_model(tmp_path / "pipe", channels_last=False)
    assert model.schedule.config == ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0195)
    assert (model.prediction_type, model.clip_sample) == ({"v_prediction": "v"}.get(prediction, prediction), clip)

    sampler = make_sampler("ddim", model.schedule, clip_sample=model.clip_sample)
    scheduler.alphas_cumprod = model.schedule.alphas_cumprod.float()  # compare the step math alone
    steps = 10
    timesteps = sampler.timesteps(steps)
    scheduler.set_timesteps(steps)
    assert scheduler.timesteps.tolist() == timesteps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 8, 8, generator=g)
    for t, t_prev in list(zip(timesteps, previous_timesteps(timesteps), strict=True))[:3]:
        tt = torch.full((2,), t)
        with torch.no_grad():
            out = pipe.unet(x, tt).sample
            eps = model.eps_from_output(x, tt, out)
        # with clipping, the direction term uses the eps the clipped x0 implies (undiffuse.samplers.DDIMSampler)
        expected = scheduler.step(out, t, x, use_clipped_model_output=clip).prev_sample
        got = sampler.step(eps, t, x, None, t_prev=t_prev).prev_sample
        assert torch.allclose(got, expected, atol=1e-5), (t, (got - expected).abs().max())
        x = expected


def test_clip_sample_reaches_the_samplers_that_have_it():
    schedule = NoiseSchedule.linear()
    assert make_sampler("ddim", schedule, clip_sample=False).clip_x0 is False
    assert make_sampler("ddpm", schedule, clip_sample=False).clip_x0 is False
    assert make_sampler("ddim", schedule).clip_x0 is True  # the sampler's default where the model says nothing
    assert make_sampler("dpmpp_2m", schedule, clip_sample=True).clip_x0 is False  # diffusers' DPM-Solver++ has none


def test_an_x0_prediction_converts_to_the_noise_it_implies():
    schedule = NoiseSchedule.scaled_linear()
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    assert torch.allclose(schedule.eps_from_sample(x_t, t, x0), eps, atol=1e-4)


def test_weights_that_are_not_whole_are_caught_when_the_folder_is_read(tmp_path):
    _pipeline(tmp_path / "pipe", diffusers.DDIMScheduler())
    spec = read_model_folder(tmp_path / "pipe")
    check_weights(spec)  # whole
    weights = tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or padded safetensors file"):
        check_weights(spec)
    weights.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        check_weights(spec)
