import math

import pytest
import torch

from undiffuse import NoiseSchedule, ScheduleConfig


@pytest.fixture(params=["linear", "cosine"])
def schedule(request) -> NoiseSchedule:
    return NoiseSchedule.from_config(ScheduleConfig(kind=request.param))


def test_alpha_bar_strictly_decreasing_inside_unit_interval(schedule):
    a = schedule.alphas_cumprod
    assert a.dtype == torch.float64 and a.shape == (1000,)
    assert bool((a > 0).all()) and bool((a < 1).all())
    assert bool((a[1:] < a[:-1]).all())


def test_linear_schedule_matches_ddpm_paper():
    s = NoiseSchedule.linear()
    assert s.betas[0].item() == pytest.approx(1e-4)
    assert s.betas[-1].item() == pytest.approx(0.02)
    # alpha_bar_T is tiny: x_T is almost pure noise (Ho et al. 2020, Sec. 4)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.04e-5, rel=0.02)


def test_cosine_schedule_follows_its_closed_form_and_cap():
    s = NoiseSchedule.cosine(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert s.alphas_cumprod[499].item() == pytest.approx(f(500) / f(0), rel=1e-9)
    assert s.betas.max().item() <= 0.999


def test_posterior_variance_formula(schedule):
    t = 10
    a, a_prev, beta = schedule.alphas_cumprod[t], schedule.alphas_cumprod[t - 1], schedule.betas[t]
    expected = (1 - a_prev) / (1 - a) * beta
    assert schedule.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-12)
    assert schedule.posterior_variance[0].item() == 0.0


@pytest.mark.slow
def test_q_sample_matches_iterated_forward_process(schedule):
    """Closed form x_t = sqrt(a_bar) x0 + sqrt(1 - a_bar) eps has the same mean and variance as
    iterating x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t (DDPM Eq. 2 vs Eq. 4)."""
    torch.manual_seed(0)
    n, t = 200_000, 300
    x0 = torch.full((n, 1, 1, 1), 0.7, dtype=torch.float64)
    x = x0.clone()
    for s in range(t + 1):
        b = schedule.betas[s]
        x = (1 - b).sqrt() * x + b.sqrt() * torch.randn_like(x)
    closed = schedule.q_sample(x0, torch.full((n,), t), torch.randn_like(x0))
    a = schedule.alphas_cumprod[t].item()
    for sample in (x, closed):
        assert sample.mean().item() == pytest.approx(0.7 * math.sqrt(a), abs=5 / math.sqrt(n))
        assert sample.var().item() == pytest.approx(1 - a, rel=0.02)
    assert (x.mean() - closed.mean()).abs().item() < 6 / math.sqrt(n)


def test_q_sample_uses_one_timestep_per_sample(schedule):
    x0 = torch.ones(3, 1, 2, 2)
    noise = torch.zeros_like(x0)
    out = schedule.q_sample(x0, torch.tensor([0, 500, 999]), noise)
    expected = schedule.alphas_cumprod[[0, 500, 999]].sqrt().float()
    assert torch.allclose(out[:, 0, 0, 0], expected)


def test_q_sample_rejects_bad_timesteps_and_shapes(schedule):
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="timestep out of range"):
        schedule.q_sample(x0, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise shape"):
        schedule.q_sample(x0, torch.tensor([0, 1]), torch.zeros(2, 1, 3, 3))


def test_velocity_round_trip(schedule):
    torch.manual_seed(1)
    x0, eps = torch.randn(4, 1, 3, 3), torch.randn(4, 1, 3, 3)
    t = torch.tensor([0, 10, 500, 999])
    x_t = schedule.q_sample(x0, t, eps)
    v = schedule.velocity(x0, t, eps)
    assert torch.allclose(schedule.eps_from_velocity(x_t, t, v), eps, atol=1e-5)


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError):
        NoiseSchedule.linear(0)
    with pytest.raises(ValueError):
        NoiseSchedule.linear(10, beta_start=0.1, beta_end=0.01)
    with pytest.raises(ValueError, match="unknown schedule kind"):
        NoiseSchedule.from_config(ScheduleConfig(kind="quadratic"))  # type: ignore[arg-type]
