"""Pinned numeric checks against diffusers' schedulers: same model output, same noise, same
x_t -> the same x_{t_prev} to 1e-5 (diffusers is a test-only dependency)."""

import diffusers  # a test dependency (requirements.lock): missing it must fail, not skip
import pytest
import torch

from undiffuse import DDIMSampler, DDPMSampler, NoiseSchedule
from undiffuse.samplers import previous_timesteps, respaced_timesteps

SHAPE = (4, 3, 8, 8)


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(SHAPE, generator=g) * 2
    eps = torch.randn(SHAPE, generator=g)
    return x_t, eps


def _schedules():
    ours_linear = NoiseSchedule.linear()
    ours_cos = NoiseSchedule.cosine()
    return [
        (ours_linear, dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        (ours_cos, dict(beta_schedule="squaredcos_cap_v2")),
    ]


def test_schedules_agree_with_diffusers():
    for ours, kwargs in _schedules():
        theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, **kwargs)
        assert torch.allclose(ours.betas.float(), theirs.betas, rtol=1e-5, atol=1e-7)
        # diffusers accumulates alpha_bar in float32; ours is float64 (see schedule.py)
        assert torch.allclose(ours.alphas_cumprod.float(), theirs.alphas_cumprod, rtol=2e-4)


def _prev(sampler, steps: int, t: int) -> int:
    """t_prev of timestep t, from the sampler's own timestep list."""
    timesteps = sampler.timesteps(steps)
    return dict(zip(timesteps, previous_timesteps(timesteps), strict=True))[t]


@pytest.mark.parametrize("variance", ["fixed_small", "fixed_large"])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [1000, 50])
@pytest.mark.parametrize("which", [0, 1])
def test_ddpm_step_matches_diffusers(variance, clip, steps, which):
    ours_schedule, kwargs = _schedules()[which]
    theirs = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type=variance, clip_sample=clip, **kwargs)
    theirs.alphas_cumprod = ours_schedule.alphas_cumprod.float()  # compare the step math alone
    theirs.set_timesteps(steps)
    ours = DDPMSampler(ours_schedule, variance=variance, clip_x0=clip)
    assert theirs.timesteps.tolist() == respaced_timesteps(1000, steps)
    for t in [theirs.timesteps[0].item(), theirs.timesteps[steps // 2].item(), 0]:
        x_t, eps = _inputs(t)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
        expected = theirs.step(eps, t, x_t, generator=torch.Generator().manual_seed(99))
        got = ours.step(eps, t, x_t, noise if t > 0 else None, t_prev=_prev(ours, steps, t))
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        assert torch.allclose(got.pred_x0, expected.pred_original_sample, atol=1e-5), t


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("which", [0, 1])
def test_ddim_step_matches_diffusers(eta, clip, steps, which):
    ours_schedule, kwargs = _schedules()[which]
    theirs = diffusers.DDIMScheduler(num_train_timesteps=1000, clip_sample=clip, set_alpha_to_one=True, **kwargs)
    theirs.alphas_cumprod = ours_schedule.alphas_cumprod.float()
    theirs.set_timesteps(steps)
    ours = DDIMSampler(ours_schedule, eta=eta, clip_x0=clip)
    assert theirs.timesteps.tolist() == respaced_timesteps(1000, steps)
    for t in [theirs.timesteps[0].item(), theirs.timesteps[steps // 2].item(), 0]:
        x_t, eps = _inputs(t + 1)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
        expected = theirs.step(eps, t, x_t, eta=eta, variance_noise=noise, use_clipped_model_output=clip)
        got = ours.step(eps, t, x_t, noise, t_prev=_prev(ours, steps, t))
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        assert torch.allclose(got.pred_x0, expected.pred_original_sample, atol=1e-5), t


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("which", [0, 1])
def test_dpmsolver_pp_2m_matches_diffusers_step_for_step(steps, which):
    """A whole run with arbitrary model outputs: every intermediate x and x_0 prediction agree
    with DPMSolverMultistepScheduler's defaults (2nd order, midpoint, dpmsolver++, final sigma 0)."""
    from undiffuse.samplers import NO_HISTORY, DPMSolverPP2MSampler

    ours_schedule, kwargs = _schedules()[which]
    theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, **kwargs)
    theirs.alphas_cumprod = ours_schedule.alphas_cumprod.float()
    theirs.alpha_t = theirs.alphas_cumprod.sqrt()
    theirs.sigma_t = (1 - theirs.alphas_cumprod).sqrt()
    theirs.lambda_t = theirs.alpha_t.log() - theirs.sigma_t.log()
    theirs.sigmas = ((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod) ** 0.5
    theirs.set_timesteps(steps)
    ours = DPMSolverPP2MSampler(ours_schedule)
    timesteps = ours.timesteps(steps)
    assert theirs.timesteps.tolist() == timesteps
    g = torch.Generator().manual_seed(steps + which)
    x = torch.randn(SHAPE, generator=g)
    target = torch.rand(SHAPE, generator=g) * 2 - 1  # outputs that point at one x_0, plus noise,
    t_last, history = NO_HISTORY, None  # so that x stays in range and atol means something
    for t, t_prev in zip(timesteps, previous_timesteps(timesteps), strict=True):
        a = ours_schedule.alphas_cumprod[t].float()
        x0 = target + 0.1 * torch.randn(SHAPE, generator=g)  # the output's x_0 prediction, kept in range
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        expected = theirs.step(eps, t, x)
        got = ours.step(eps, torch.full((SHAPE[0],), t), x, t_prev=t_prev, t_last=t_last, history=history)
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        x = expected.prev_sample  # each step from the same x: step math, not accumulated rounding
        t_last, history = t, got.pred_x0


def _thresholding():
    """Ours and diffusers' dynamic thresholding, at a ratio and maximum other than the defaults."""
    from undiffuse.config import Thresholding

    return Thresholding(0.9, 1.5), dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)


def test_dynamic_threshold_matches_diffusers_per_row():
    """Row by row as diffusers' _threshold_sample (torch.quantile), over rows whose quantile is
    below 1, between 1 and the maximum, and above it, and at ratios that interpolate and that
    do not; a row's result ignores its neighbours."""
    from undiffuse.config import Thresholding
    from undiffuse.samplers import dynamic_threshold

    ours, kwargs = _thresholding()
    theirs = diffusers.DDPMScheduler(**kwargs)
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(6, 3, 16, 16, generator=g) * torch.tensor([0.3, 0.8, 1.2, 1.6, 3.0, 10.0]).view(-1, 1, 1, 1)
    expected = theirs._threshold_sample(x0.clone())
    got = dynamic_threshold(x0, ours)
    assert torch.equal(got, expected)  # bit for bit: the same rank and weight arithmetic
    for ratio in (0.5, 0.995, 0.9999, 1.0):
        other = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=ratio, sample_max_value=2.5)
        mine = dynamic_threshold(x0[:, :2, :7], Thresholding(ratio, 2.5))  # 98 values a row
        assert torch.equal(mine, other._threshold_sample(x0[:, :2, :7].clone())), ratio
    assert torch.equal(dynamic_threshold(x0[2:3], ours), got[2:3])  # alone, the same row
    assert got.abs().max() <= 1 + 1e-6 and not torch.equal(got, x0.clamp(-1, 1))  # not plain clipping


@pytest.mark.parametrize("steps", [50, 10])
@pytest.mark.parametrize("which", [0, 1])
def test_ddpm_and_ddim_steps_with_thresholding_match_diffusers(steps, which):
    ours_schedule, kwargs = _schedules()[which]
    ours_cfg, threshold_kwargs = _thresholding()
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=1000, **kwargs, **threshold_kwargs)
    ddim = diffusers.DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=True, **kwargs, **threshold_kwargs)
    for theirs in (ddpm, ddim):
        theirs.alphas_cumprod = ours_schedule.alphas_cumprod.float()
        theirs.set_timesteps(steps)
    ours_ddpm = DDPMSampler(ours_schedule, thresholding=ours_cfg)
    ours_ddim = DDIMSampler(ours_schedule, eta=0.5, thresholding=ours_cfg)
    thresholded = 0
    for t in [ddim.timesteps[0].item(), ddim.timesteps[steps // 2].item(), 0]:
        x_t, eps = _inputs(t + 5)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))
        expected = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(99))
        got = ours_ddpm.step(eps, t, x_t, noise if t > 0 else None, t_prev=_prev(ours_ddpm, steps, t))
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        assert torch.allclose(got.pred_x0, expected.pred_original_sample, atol=1e-5), t
        expected = ddim.step(eps, t, x_t, eta=0.5, variance_noise=noise, use_clipped_model_output=True)
        got = ours_ddim.step(eps, t, x_t, noise, t_prev=_prev(ours_ddim, steps, t))
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        assert torch.allclose(got.pred_x0, expected.pred_original_sample, atol=1e-5), t
        raw = ours_schedule.predict_x0(x_t, t, eps)
        thresholded += int(not torch.allclose(got.pred_x0, raw.clamp(-1, 1)))
    assert thresholded >= 1  # the inputs reach the threshold: not just the clip


@pytest.mark.parametrize("which", [0, 1])
def test_dpmsolver_pp_2m_with_thresholding_matches_diffusers_step_for_step(which):
    from undiffuse.samplers import NO_HISTORY, DPMSolverPP2MSampler

    ours_schedule, kwargs = _schedules()[which]
    ours_cfg, threshold_kwargs = _thresholding()
    theirs = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=1000, **kwargs, **threshold_kwargs)
    theirs.alphas_cumprod = ours_schedule.alphas_cumprod.float()
    theirs.alpha_t = theirs.alphas_cumprod.sqrt()
    theirs.sigma_t = (1 - theirs.alphas_cumprod).sqrt()
    theirs.lambda_t = theirs.alpha_t.log() - theirs.sigma_t.log()
    theirs.sigmas = ((1 - theirs.alphas_cumprod) / theirs.alphas_cumprod) ** 0.5
    theirs.set_timesteps(20)
    ours = DPMSolverPP2MSampler(ours_schedule, thresholding=ours_cfg)
    timesteps = ours.timesteps(20)
    g = torch.Generator().manual_seed(which)
    x = torch.randn(SHAPE, generator=g)
    target = (torch.rand(SHAPE, generator=g) * 2 - 1) * 1.4  # x_0 predictions that reach the threshold
    t_last, history = NO_HISTORY, None
    for t, t_prev in zip(timesteps, previous_timesteps(timesteps), strict=True):
        a = ours_schedule.alphas_cumprod[t].float()
        x0 = target + 0.1 * torch.randn(SHAPE, generator=g)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        expected = theirs.step(eps, t, x)
        got = ours.step(eps, torch.full((SHAPE[0],), t), x, t_prev=t_prev, t_last=t_last, history=history)
        assert torch.allclose(got.prev_sample, expected.prev_sample, atol=1e-5), t
        assert got.pred_x0.abs().max() <= 1 + 1e-6
        x = expected.prev_sample
        t_last, history = t, got.pred_x0
