"""One conformance suite for every sampler: exactness on Gaussian data, batch invariance,
callbacks and argument checks."""

import math

import pytest
import torch

from undiffuse import DDIMSampler, DDPMSampler, ImageNoise, NoiseSchedule, UNet, UNetConfig
from undiffuse.samplers import (
    COLUMNS,
    LAST,
    NO_HISTORY,
    DPMSolverPP2MLogSNRSampler,
    DPMSolverPP2MSampler,
    batch_terms,
    guided_timesteps,
    respaced_timesteps,
    update,
)

MU, SIGMA = 0.5, 0.3


def gaussian_optimal_eps(schedule: NoiseSchedule):
    """The exact E[eps | x_t] when the data are N(MU, SIGMA^2 I):
    x_t ~ N(sqrt(a) MU, a SIGMA^2 + 1 - a), so E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) MU) / var."""

    def eps_model(x_t, t):
        a = schedule.gather(schedule.alphas_cumprod, t, x_t)
        return (1 - a).sqrt() * (x_t - a.sqrt() * MU) / (a * SIGMA**2 + 1 - a)

    return eps_model


# With the exact eps the only error left is the discretisation of the reverse process, which
# vanishes as steps -> T (test_error_shrinks_with_more_steps); these run at T or close to it.
SAMPLERS = {
    "ddpm-small-1000": (lambda s: DDPMSampler(s, variance="fixed_small", clip_x0=False), 1000),
    "ddpm-large-1000": (lambda s: DDPMSampler(s, variance="fixed_large", clip_x0=False), 1000),
    "ddim-eta0-1000": (lambda s: DDIMSampler(s, eta=0.0, clip_x0=False), 1000),
    "ddim-eta0-250": (lambda s: DDIMSampler(s, eta=0.0, clip_x0=False), 250),
    "ddim-eta1-1000": (lambda s: DDIMSampler(s, eta=1.0, clip_x0=False), 1000),
    "dpmpp_2m-100": (lambda s: DPMSolverPP2MSampler(s), 100),  # a second-order ODE solver: far fewer steps
    "dpmpp_2m_logsnr-100": (lambda s: DPMSolverPP2MLogSNRSampler(s), 100),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["linear", "cosine"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reproduces_gaussian_data_distribution(name, kind):
    schedule = NoiseSchedule.linear() if kind == "linear" else NoiseSchedule.cosine()
    make, steps = SAMPLERS[name]
    n, shape = 2000, (1, 4, 4)
    x = make(schedule).sample(gaussian_optimal_eps(schedule), shape, steps=steps, noise=ImageNoise.for_request(0, n))
    samples = x.double().flatten()
    se_mean = SIGMA / math.sqrt(samples.numel())
    assert samples.mean().item() == pytest.approx(MU, abs=5 * se_mean + 0.01)
    # fixed_large adds beta_t instead of the posterior variance and over-disperses a little
    rel = 0.10 if "large" in name else 0.03
    assert samples.std().item() == pytest.approx(SIGMA, rel=rel)


def test_dpmsolver_pp_2m_at_20_steps_is_closer_to_the_data_than_ddim_at_20():
    """The point of a second-order solver: less discretisation error at equal steps."""
    schedule = NoiseSchedule.linear()
    noise = ImageNoise.for_request(0, 2000)
    error = {}
    for name, sampler in (("ddim", DDIMSampler(schedule, clip_x0=False)), ("dpm", DPMSolverPP2MSampler(schedule))):
        x = sampler.sample(gaussian_optimal_eps(schedule), (1, 4, 4), steps=20, noise=noise)
        error[name] = abs(x.double().std().item() - SIGMA) + abs(x.double().mean().item() - MU)
    assert error["dpm"] < error["ddim"]


def test_dpmsolver_pp_2m_rows_with_and_without_history_step_like_each_row_alone():
    """Per-row history: rows on their first step (no history), in the middle (second order) and
    on their last step (first order, to x_0) in one call equal each row stepped alone."""
    from undiffuse.samplers import NO_HISTORY

    sampler = DPMSolverPP2MSampler(NoiseSchedule.linear())
    gen = torch.Generator().manual_seed(4)
    x, eps, history = (torch.randn(3, 1, 4, 4, generator=gen) for _ in range(3))
    t, t_prev, t_last = (
        torch.tensor([999, 500, 100]),
        torch.tensor([899, 400, -1]),
        torch.tensor([NO_HISTORY, 600, 200]),
    )
    batch = sampler.step(eps, t, x, t_prev=t_prev, t_last=t_last, history=history)
    for i in range(3):
        alone = sampler.step(
            eps[i : i + 1], int(t[i]), x[i : i + 1], t_prev=int(t_prev[i]), t_last=int(t_last[i]),
            history=history[i : i + 1],
        )  # fmt: skip
        assert torch.allclose(batch.prev_sample[i], alone.prev_sample[0], atol=1e-6), i
    first_order = sampler.step(eps[:1], 999, x[:1], t_prev=899)  # no history at all
    assert torch.allclose(batch.prev_sample[0], first_order.prev_sample[0], atol=1e-6)
    assert torch.allclose(batch.prev_sample[2], batch.pred_x0[2], atol=1e-6)  # the last step lands on x_0
    assert not torch.allclose(batch.prev_sample[1], sampler.step(eps[1:2], 500, x[1:2], t_prev=400).prev_sample[0])


def test_error_shrinks_with_more_steps():
    schedule = NoiseSchedule.linear()
    errors = []
    for steps in (20, 100, 500):
        x = DDIMSampler(schedule, clip_x0=False).sample(
            gaussian_optimal_eps(schedule), (1, 4, 4), steps=steps, noise=ImageNoise.for_request(0, 2000)
        )
        errors.append(abs(x.double().std().item() - SIGMA))
    assert errors[0] > errors[1] > errors[2]


def test_ddim_with_eta_one_is_ddpm_with_posterior_variance():
    """DDIM Eq. 16 with eta = 1 gives exactly DDPM's sigma_t^2 = beta tilde (Song et al., Sec. 4.1)."""
    schedule = NoiseSchedule.cosine()
    eps = gaussian_optimal_eps(schedule)
    noise = ImageNoise.for_request(11, 64)
    a = DDPMSampler(schedule, clip_x0=False).sample(eps, (1, 4, 4), steps=50, noise=noise)
    b = DDIMSampler(schedule, eta=1.0, clip_x0=False).sample(eps, (1, 4, 4), steps=50, noise=noise)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_unet():
    torch.manual_seed(0)
    net = UNet(
        UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=3)
    )
    # the zero-initialised output would make every image equal; perturb it so images differ
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


@pytest.mark.slow
@pytest.mark.parametrize("sampler", [DDPMSampler(NoiseSchedule.linear()), DDIMSampler(NoiseSchedule.linear(), eta=0.5)])
def test_same_seed_and_index_give_the_same_image_alone_and_in_a_batch(tiny_unet, sampler):
    shape, steps = (1, 8, 8), 10
    labels_batch = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    batch = sampler.sample(
        tiny_unet, shape, steps=steps, noise=ImageNoise([3] * 8, list(range(8))), class_labels=labels_batch
    )
    alone = sampler.sample(tiny_unet, shape, steps=steps, noise=ImageNoise([3], [5]), class_labels=labels_batch[5:6])
    # a shard on another replica: images 4..7 of the same request
    shard = sampler.sample(
        tiny_unet, shape, steps=steps, noise=ImageNoise([3] * 4, [4, 5, 6, 7]), class_labels=labels_batch[4:]
    )
    assert torch.allclose(alone[0], batch[5], atol=1e-5)
    assert torch.allclose(shard, batch[4:], atol=1e-5)
    assert not torch.allclose(batch[4], batch[5], atol=1e-3)


@pytest.mark.slow
def test_guidance_scale_one_is_plain_conditional_and_other_scales_differ(tiny_unet):
    sampler = DDIMSampler(NoiseSchedule.linear())
    labels = torch.tensor([1, 2])
    run = lambda w: sampler.sample(  # noqa: E731
        tiny_unet, (1, 8, 8), steps=5, noise=ImageNoise.for_request(0, 2), class_labels=labels, guidance_scale=w
    )
    plain = run(1.0)
    assert torch.allclose(plain, run(1.0))
    assert not torch.allclose(plain, run(3.0), atol=1e-4)


def test_callback_sees_every_step_in_order_and_can_stop_the_loop():
    schedule = NoiseSchedule.linear()
    seen = []
    sampler = DDIMSampler(schedule)
    sampler.sample(
        gaussian_optimal_eps(schedule),
        (1, 2, 2),
        steps=20,
        noise=ImageNoise.for_request(0, 3),
        callback=lambda i, t, x, x0: seen.append((i, t, tuple(x.shape), tuple(x0.shape))),
    )
    assert [s[0] for s in seen] == list(range(20))
    assert [s[1] for s in seen] == respaced_timesteps(1000, 20)
    assert all(s[2] == s[3] == (3, 1, 2, 2) for s in seen)

    class Stop(Exception):
        pass

    def stop_at_3(i, *_):
        if i == 3:
            raise Stop

    with pytest.raises(Stop):
        sampler.sample(
            gaussian_optimal_eps(schedule), (1, 2, 2), steps=20, noise=ImageNoise.for_request(0, 1), callback=stop_at_3
        )


def test_explicit_x_T_is_used():
    schedule = NoiseSchedule.linear()
    sampler = DDIMSampler(schedule)
    x_T = torch.zeros(2, 1, 2, 2)
    out = sampler.sample(
        lambda x, t: torch.zeros_like(x), (1, 2, 2), steps=10, noise=ImageNoise.for_request(0, 2), x_T=x_T
    )
    assert torch.allclose(out, torch.zeros_like(out))  # zero noise prediction keeps x = 0
    with pytest.raises(ValueError, match="x_T must have shape"):
        sampler.sample(lambda x, t: x, (1, 2, 2), steps=10, noise=ImageNoise.for_request(0, 3), x_T=x_T)


def test_respacing_and_argument_checks():
    assert respaced_timesteps(1000, 4) == [750, 500, 250, 0]
    assert respaced_timesteps(1000, 1000)[:3] == [999, 998, 997]
    with pytest.raises(ValueError, match="steps must be in"):
        respaced_timesteps(1000, 1001)
    with pytest.raises(ValueError, match="eta"):
        DDIMSampler(NoiseSchedule.linear(), eta=1.5)
    with pytest.raises(ValueError, match="variance"):
        DDPMSampler(NoiseSchedule.linear(), variance="learned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs noise"):
        DDPMSampler(NoiseSchedule.linear()).step(torch.zeros(1, 1, 2, 2), 5, torch.zeros(1, 1, 2, 2), t_prev=4)


@pytest.mark.parametrize(
    "make", [lambda s: DDPMSampler(s), lambda s: DDIMSampler(s, eta=0.7), lambda s: DDIMSampler(s)]
)
def test_rows_at_different_timesteps_step_like_each_row_alone(make):
    """One step() call over rows at different (t, t_prev), last steps included, equals stepping
    each row alone with scalar timesteps: what a continuous-batching engine relies on."""
    sampler = make(NoiseSchedule.linear())
    gen = torch.Generator().manual_seed(3)
    x, eps, noise = (torch.randn(4, 1, 4, 4, generator=gen) for _ in range(3))
    t = torch.tensor([980, 500, 20, 0])
    t_prev = torch.tensor([960, 480, 0, -1])
    batch = sampler.step(eps, t, x, noise, t_prev=t_prev)
    for i in range(4):
        alone = sampler.step(eps[i : i + 1], int(t[i]), x[i : i + 1], noise[i : i + 1], t_prev=int(t_prev[i]))
        assert torch.allclose(batch.prev_sample[i], alone.prev_sample[0], atol=1e-6), i
        assert torch.allclose(batch.pred_x0[i], alone.pred_x0[0], atol=1e-6), i
    # the last step adds no noise, whatever noise is passed
    other = sampler.step(eps, t, x, noise + 1, t_prev=t_prev)
    assert torch.equal(other.prev_sample[3], batch.prev_sample[3])


def test_previous_timestep_comes_from_the_timestep_list_not_even_spacing():
    """A sampler with an uneven timestep list steps to the list's next entry."""

    class Uneven(DDIMSampler):
        def timesteps(self, steps):
            return [900, 400, 50, 0][:steps]

    schedule = NoiseSchedule.linear()
    seen = []
    sampler = Uneven(schedule)
    original = sampler.coefficients

    def spy(t, t_prev, t_last=-1):
        seen.extend(zip(torch.as_tensor(t).tolist(), torch.as_tensor(t_prev).tolist(), strict=True))
        return original(t, t_prev, t_last)

    sampler.coefficients = spy
    sampler.sample(lambda x, t: torch.zeros_like(x), (1, 2, 2), steps=4, noise=ImageNoise.for_request(0, 2))
    assert seen == [(900, 400), (400, 50), (50, 0), (0, -1)]


def test_an_int_timestep_beside_per_row_tensors_applies_to_every_row():
    sampler = DDIMSampler(NoiseSchedule.linear(), eta=0.5)
    gen = torch.Generator().manual_seed(5)
    x, eps, noise = (torch.randn(4, 1, 4, 4, generator=gen) for _ in range(3))
    both = sampler.step(eps, torch.full((4,), 500), x, noise, t_prev=torch.full((4,), 480))
    mixed = sampler.step(eps, 500, x, noise, t_prev=torch.full((4,), 480))
    other = sampler.step(eps, torch.full((4,), 500), x, noise, t_prev=480)
    assert torch.equal(both.prev_sample, mixed.prev_sample) and torch.equal(both.prev_sample, other.prev_sample)


def test_dpmsolver_pp_2m_at_every_timestep_visits_each_once_and_stays_finite():
    """Regression: at steps = T the linspace grid repeated a timestep (a zero-length step, then a
    division by it), and every image came out NaN."""
    schedule = NoiseSchedule.linear(50)
    sampler = DPMSolverPP2MSampler(schedule)
    assert sampler.timesteps(50) == list(range(49, -1, -1))
    assert len(set(sampler.timesteps(49))) == 49
    x = sampler.sample(gaussian_optimal_eps(schedule), (1, 4, 4), steps=50, noise=ImageNoise.for_request(0, 8))
    assert torch.isfinite(x).all()


@pytest.mark.slow
def test_guidance_acts_only_inside_the_models_noise_interval(tiny_unet):
    schedule = NoiseSchedule.linear()
    a_bar = schedule.alphas_cumprod
    sigma = ((1 - a_bar) / a_bar).sqrt()
    assert guided_timesteps(schedule, None).all()
    inside = guided_timesteps(schedule, (0.28, 5.42))
    assert torch.equal(inside, (sigma > 0.28) & (sigma <= 5.42))
    assert inside.any() and not inside.all() and not inside[0] and not inside[-1]

    sampler = DDIMSampler(schedule)
    labels = torch.tensor([1, 2])
    run = lambda w, interval: sampler.sample(  # noqa: E731
        tiny_unet, (1, 8, 8), steps=10, noise=ImageNoise.for_request(0, 2), class_labels=labels,
        guidance_scale=w, guidance_interval=interval,
    )  # fmt: skip
    plain, everywhere = run(1.0, None), run(3.0, None)
    assert torch.equal(run(3.0, (1e6, 2e6)), plain)  # an interval no step falls in: no guidance
    assert torch.equal(run(3.0, (0.0, float("inf"))), everywhere)
    middle = run(3.0, (0.28, 5.42))
    assert not torch.allclose(middle, plain, atol=1e-4) and not torch.allclose(middle, everywhere, atol=1e-4)


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_logsnr_timesteps_are_distinct_and_evenly_spaced_in_log_snr(kind):
    schedule = NoiseSchedule.linear() if kind == "linear" else NoiseSchedule.cosine()
    sampler = DPMSolverPP2MLogSNRSampler(schedule)
    a = schedule.alphas_cumprod.double()
    lam = 0.5 * (a.log() - (1 - a).log())
    for steps in (1, 2, 7, 10, 20, 100, 999, 1000):
        ts = sampler.timesteps(steps)
        assert len(ts) == steps and ts[0] == 999 and ts[-1] >= 0
        assert all(u > v for u, v in zip(ts, ts[1:], strict=False)), steps
    assert sampler.timesteps(1000) == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="steps must be in"):
        sampler.timesteps(0)
    if kind == "cosine":
        return  # its last timesteps span 4 units of log-SNR (max_beta): there, steps are nudged apart
    ts = sampler.timesteps(10)  # few steps: every one is the nearest timestep to its target
    gap = (lam[0] - lam[-1]).item() / 10
    for i, t in enumerate(ts):
        off = abs(lam[t].item() - (lam[-1].item() + i * gap))
        neighbours = [abs(lam[u].item() - (lam[-1].item() + i * gap)) for u in (t - 1, t + 1) if 0 <= u <= 999]
        assert off <= min(neighbours), (i, t)


def test_logsnr_spacing_is_closer_to_the_data_than_linspace_at_10_steps():
    """What the spacing is for: fewer steps where log-SNR changes slowly (high noise)."""
    schedule = NoiseSchedule.linear()
    noise = ImageNoise.for_request(0, 2000)
    error = {}
    for name, sampler in (
        ("linspace", DPMSolverPP2MSampler(schedule)),
        ("logsnr", DPMSolverPP2MLogSNRSampler(schedule)),
    ):
        x = sampler.sample(gaussian_optimal_eps(schedule), (1, 4, 4), steps=10, noise=noise)
        error[name] = abs(x.double().std().item() - SIGMA) + abs(x.double().mean().item() - MU)
    assert error["logsnr"] < error["linspace"], error


def test_one_update_steps_rows_of_every_sampler_as_their_own_steps_do():
    """Rows of DDPM (noise), DDIM (clipped x0 and the eps it implies), DDIM with eta (noise) and
    DPM-Solver++(2M) (unclipped, with a history) at their own timesteps in one `update` call come
    out bit for bit as each sampler's own step: a term that a row does not use adds exactly 0,
    so a row's step does not depend on its neighbours' samplers (what the engine relies on)."""
    schedule = NoiseSchedule.linear()
    samplers = [
        DDPMSampler(schedule),
        DDIMSampler(schedule),
        DDIMSampler(schedule, eta=0.5),
        DPMSolverPP2MSampler(schedule),
    ]
    steps = [(600, 400, NO_HISTORY), (500, LAST, NO_HISTORY), (300, 200, NO_HISTORY), (400, 300, 500)]
    g = torch.Generator().manual_seed(0)
    x, eps, history = (torch.randn(8, 1, 4, 4, generator=g) * 2 for _ in range(3))
    noise = torch.randn(4, 1, 4, 4, generator=g)  # rows 0, 1 (DDPM) and 4, 5 (DDIM eta 0.5)
    coef = torch.cat(
        [s.coefficients(t, tp, tl).expand(2, len(COLUMNS)) for s, (t, tp, tl) in zip(samplers, steps, strict=True)]
    )
    terms = batch_terms(samplers)
    assert {"clip_rows", "x", "eps_x0", "history"} <= terms and "clip" not in terms  # DPM-Solver does not clip
    prev, x0 = update(x, eps, coef.float(), terms, history=history, noise=noise, noise_rows=torch.tensor([0, 1, 4, 5]))
    for k, (sampler, (t, t_prev, t_last)) in enumerate(zip(samplers, steps, strict=True)):
        rows = slice(2 * k, 2 * k + 2)
        z = noise[:2] if k == 0 else noise[2:] if k == 2 else None
        kwargs = {"t_last": t_last, "history": history[rows]} if sampler.multistep else {}
        own = sampler.step(eps[rows], t, x[rows], z, t_prev=t_prev, **kwargs)
        assert torch.equal(prev[rows], own.prev_sample), type(sampler).__name__
        assert torch.equal(x0[rows], own.pred_x0), type(sampler).__name__
    assert x0[:6].abs().max() <= 1 and x0[6:].abs().max() > 1  # clipped rows, and the unclipped ones
    with pytest.raises(ValueError, match="history"):
        update(x, eps, coef.float(), terms, noise=noise, noise_rows=torch.tensor([0, 1, 4, 5]))


def test_a_coefficient_table_holds_each_steps_coefficients_then_zeros():
    """The engine's tables (`coefficient_table`) are the coefficients of each step of a run, from
    its own timestep list (t_prev the next entry, t_last the one before), in float32."""
    schedule = NoiseSchedule.linear()
    for sampler in (DDPMSampler(schedule), DDIMSampler(schedule, eta=0.3), DPMSolverPP2MLogSNRSampler(schedule)):
        ts = sampler.timesteps(6)
        table = sampler.coefficient_table(6)
        assert table.shape == (7, len(COLUMNS)) and table.dtype == torch.float32
        assert (table[-1] == 0).all()
        for k, t in enumerate(ts):
            t_prev = ts[k + 1] if k + 1 < len(ts) else LAST
            t_last = ts[k - 1] if k else NO_HISTORY
            assert torch.equal(table[k], sampler.coefficients(t, t_prev, t_last).float()), (sampler.name, k)


def test_thresholdings_quantile_rank_is_float32s_and_a_compiled_update_traces_it_whole():
    """The rank of the thresholding quantile is computed in Python with float32's rounding (what
    torch.quantile and diffusers compute), so a compiled update with thresholding traces as one
    graph (a tensor read back to a Python int would break it)."""
    import random

    import torch._dynamo

    from undiffuse.config import Thresholding
    from undiffuse.samplers import _float32

    rng = random.Random(0)
    for _ in range(2000):
        ratio, n = rng.random(), rng.randint(2, 10**6)
        assert _float32(_float32(ratio) * (n - 1)) == float(torch.tensor(ratio, dtype=torch.float32) * (n - 1))
    sampler = DDIMSampler(NoiseSchedule.linear(), thresholding=Thresholding(ratio=0.995, max_value=1.5))
    x, eps = torch.randn(3, 1, 8, 8) * 2, torch.randn(3, 1, 8, 8)
    coef = sampler.coefficients(500, 480).float().expand(3, len(COLUMNS))
    explained = torch._dynamo.explain(update)(x, eps, coef, sampler.terms, thresholding=sampler.thresholding)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
