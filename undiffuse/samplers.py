"""Reverse samplers: DDPM ancestral sampling, DDIM and DPM-Solver++(2M), over respaced timesteps.

A sampler knows the schedule, never the network: `sample()` calls any
`eps_model(x_t, t) -> eps` (or `eps_model(x_t, t, class_labels)` for a conditional model), and
`step()` maps (model output, t, x_t, noise) to x_{t_prev} for the whole batch at once.

Every step is per row: t and t_prev are [N] long tensors, so one call can advance rows that
sit at different timesteps (what a continuous-batching engine does); an int means "the same for
every row". t_prev comes from the sampler's own timestep list (`timesteps(steps)`), and
t_prev = -1 marks a row's last step, whose "previous" signal level is alpha_bar = 1 (x_0).

Every sampler is a set of per-row coefficients of one elementwise step, `update` (x̂₀ from the
noise, limited, then x_{t_prev} as a combination of x_t, x̂₀, the noise, the eps the limited x̂₀
implies, the previous x̂₀ and fresh noise). The coefficients depend only on (t, t_prev, t_last),
so they are computed on the host in float64 (`coefficients`) and cast once; a run's are one
table (`coefficient_table`), which the denoising engine keeps on the device and gathers per row,
so one `update` call advances rows of every sampler at their own steps and never reads the
device. `step` and `sample` go through the same `update` (compiled with `Sampler.compile`, as in
an engine that compiles), so a row comes out the same bits through either.

Timesteps are respaced the way diffusers' "leading" spacing does it, so a 50-step sampler
visits t = 980, 960, ..., 0 of a T = 1000 schedule, and both samplers agree with diffusers'
DDPMScheduler / DDIMScheduler step for step (tests/core/test_diffusers_parity.py).
DPM-Solver++(2M) uses diffusers' "linspace" spacing (t = 999, ..., ending at x_0) and agrees
with DPMSolverMultistepScheduler step for step.

A multistep sampler (`multistep = True`) also reads each row's history: the x_0 prediction of
its previous step (`history`, [N, C, H, W]) and that step's timestep (`t_last`, [N] long,
NO_HISTORY on a row's first step). Its StepOutput.pred_x0 is the rows' next history.

New samplers subclass `Sampler` and get an entry in `undiffuse.registry`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from undiffuse.compiled import allow_recompiles
from undiffuse.config import Thresholding
from undiffuse.noise import ImageNoise
from undiffuse.schedule import NoiseSchedule

VarianceType = Literal["fixed_small", "fixed_large"]
NULL_CLASS = -1  # the label a conditional model reads as "no class" (classifier-free guidance)
LAST = -1  # t_prev of a row's last step
NO_HISTORY = -1  # t_last of a row's first step (a multistep sampler has no previous x_0 yet)


class EpsModel(Protocol):
    def __call__(self, x_t: Tensor, t: Tensor, *args: Tensor) -> Tensor: ...


@dataclass
class StepOutput:
    prev_sample: Tensor  # x_{t_prev}: [N, C, H, W]
    pred_x0: Tensor  # the model's estimate of x_0: [N, C, H, W]


StepCallback = Callable[[int, int, Tensor, Tensor], None]
"""callback(step_index, t, x_t, pred_x0), called after every step; it may raise to stop."""


def respaced_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The `steps` timesteps visited by a sampler, descending ("leading" spacing)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    ratio = num_timesteps // steps
    return [i * ratio for i in range(steps - 1, -1, -1)]


def previous_timesteps(timesteps: Sequence[int]) -> list[int]:
    """t_prev for each entry of a descending timestep list: the next entry, LAST for the end."""
    return [*timesteps[1:], LAST]


def guided_eps(
    eps_model: EpsModel,
    x_t: Tensor,
    t: Tensor,
    class_labels: Tensor | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): eps_u + w * (eps_c - eps_u).

    w = 1 is plain conditional sampling (one network call); w != 1 evaluates the conditional
    and unconditional halves in one batch of 2N.
    """
    if class_labels is None:
        return eps_model(x_t, t)
    if guidance_scale == 1.0:
        return eps_model(x_t, t, class_labels)
    null = torch.full_like(class_labels, NULL_CLASS)
    both = eps_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([class_labels, null]))
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)


def guided_timesteps(schedule: NoiseSchedule, interval: tuple[float, float] | None) -> Tensor:
    """[T] bool: the timesteps where guidance acts, those with low < sigma_t <= high, where
    sigma_t = sqrt((1 - a_bar_t) / a_bar_t) (EDM's noise level); every one when interval is None.

    Guidance in a limited interval (Kynkaanniemi et al. 2024): at high noise it pulls every
    sample of a class towards the same few shapes, and at low noise it does little, so guiding
    only the middle keeps the class without losing the variety (docs/quality.md measures it).
    """
    a_bar = schedule.alphas_cumprod
    if interval is None:
        return torch.ones(a_bar.shape, dtype=torch.bool)
    sigma = ((1 - a_bar) / a_bar).sqrt()
    return (sigma > interval[0]) & (sigma <= interval[1])


def _float32(value: float) -> float:
    """A non-negative float rounded to the nearest float32 (ties to even), in Python: the
    product of two float32 values is exact in a float64, so rounding it gives float32's."""
    if value == 0:
        return 0.0
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= mantissa < 1
    return round(mantissa * 2**24) / 2**24 * 2.0**exponent


def dynamic_threshold(x0: Tensor, thresholding: Thresholding) -> Tensor:
    """x̂₀ [N, ...] thresholded per row (`undiffuse.config.Thresholding`): s = the ratio quantile
    of |x̂₀| over the row (linearly interpolated, as torch.quantile, which diffusers uses and which
    refuses inputs over 2**24 values: batches of large images exceed that), clamped to [1,
    max_value]; then clamp(x̂₀, -s, s) / s. Rows are independent: a row's result does not depend
    on its neighbours."""
    flat = x0.reshape(x0.shape[0], -1).abs().float()
    # the rank and its weight in float32, as torch.quantile computes them: the same bits (on the
    # host in Python, so that a compiled update traces through without a graph break)
    rank = _float32(_float32(thresholding.ratio) * (flat.shape[1] - 1))
    below, above = math.floor(rank), math.ceil(rank)
    low = flat.kthvalue(below + 1, dim=1).values
    high = low if above == below else flat.kthvalue(above + 1, dim=1).values
    s = torch.lerp(low, high, rank - below).clamp(min=1.0, max=thresholding.max_value)
    s = s.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.clamp(x0, -s, s) / s


COLUMNS = ("s0", "s1", "lo", "hi", "c_x0", "c_x", "c_eps", "c_eps_x0", "c_h", "c_z")
"""The per-row coefficients of `update`, in the order of a coefficient tensor's last dimension."""
S0, S1, LO, HI, C_X0, C_X, C_EPS, C_EPS_X0, C_H, C_Z = range(len(COLUMNS))


def update(
    x_t: Tensor,
    eps: Tensor,
    coef: Tensor,
    terms: frozenset[str],
    *,
    thresholding: Thresholding | None = None,
    history: Tensor | None = None,
    noise: Tensor | None = None,
    noise_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Every sampler's step, row by row: (x_{t_prev}, x̂₀) from x_t and the predicted noise.

    x_t, eps: [N, C, H, W]; coef: [N, len(COLUMNS)] (`Sampler.coefficients`, any float dtype:
    cast to x_t's); terms: which of the optional terms below any row uses (a term no row uses is
    skipped; a row that does not use a present term has coefficient 0 there, which adds exactly
    0, so a row's result does not depend on its neighbours' samplers):

        x̂₀   = limit((x_t - s1 * eps) / s0)      clamp to [-1, 1] ("clip") or to each row's
                                                  [lo, hi] ("clip_rows"), or thresholding
        prev = c_x0 * x̂₀
             + c_x * x_t                          "x"
             + c_eps * eps                        "eps"
             + c_eps_x0 * (x_t - s0 * x̂₀) / s1     "eps_x0": the eps that the limited x̂₀ implies
             + c_h * (x̂₀ - history)               "history": a multistep sampler's previous x̂₀
             + c_z * noise                        where noise is given (rows noise_rows, or all)

    history: [N, C, H, W] (required with "history"); noise: [N, ...] standard normal, or [M, ...]
    for the rows `noise_rows` ([M] long) only. The engine and `Sampler.sample` both step through
    here, so a row comes out the same bits either way; in-place multiply-adds keep a step at a
    few passes over the rows, with a temporary only for the eps_x0, history and noise terms.
    """
    n = x_t.shape[0]
    c = coef.to(x_t.dtype).reshape(n, len(COLUMNS), *([1] * (x_t.ndim - 1)))
    x0 = torch.addcmul(x_t, c[:, S1], eps, value=-1).div_(c[:, S0])
    if thresholding is not None:
        x0 = dynamic_threshold(x0, thresholding)
    elif "clip" in terms:  # every row clips
        x0 = x0.clamp_(-1.0, 1.0)
    elif "clip_rows" in terms:  # some rows clip, the others have bounds of -inf, inf
        x0 = x0.clamp_(c[:, LO], c[:, HI])
    prev = c[:, C_X0] * x0
    if "x" in terms:
        prev.addcmul_(c[:, C_X], x_t)
    if "eps" in terms:
        prev.addcmul_(c[:, C_EPS], eps)
    if "eps_x0" in terms:
        prev.addcmul_(c[:, C_EPS_X0], torch.addcmul(x_t, c[:, S0], x0, value=-1).div_(c[:, S1]))
    if "history" in terms:
        if history is None:
            raise ValueError("a multistep step needs each row's previous x_0 (history)")
        prev.addcmul_(c[:, C_H], x0 - history)
    if noise is not None:
        if noise_rows is None:
            prev.add_(c[:, C_Z] * noise)
        else:
            prev.index_add_(0, noise_rows, c[noise_rows, C_Z] * noise)
    return prev, x0


def batch_terms(samplers: Sequence[Sampler]) -> frozenset[str]:
    """The terms of `update` that one call over rows of these samplers needs: each one's, with
    "clip" (every row clips to [-1, 1]) made per row ("clip_rows") where only some of them clip."""
    terms = frozenset().union(*(s.terms for s in samplers))
    if "clip" in terms and not all("clip" in s.terms for s in samplers):
        terms = terms - {"clip"} | {"clip_rows"}
    return terms


_compiled_update: Callable[..., tuple[Tensor, Tensor]] | None = None


def _inductor_config():
    import torch._inductor.config

    return torch._inductor.config


def compiled_update() -> Callable[..., tuple[Tensor, Tensor]]:
    """`update` compiled with torch.compile (dynamic shapes): the step's arithmetic in one fused
    kernel instead of a pass over the rows per term, compiled once per combination of terms
    and shared by every engine and sampler of the process (`Sampler.compile`), so that a
    compiled engine's rows still equal a compiled sampler's bit for bit."""
    global _compiled_update
    if _compiled_update is None:
        allow_recompiles(64)  # a graph per combination of terms and of absent inputs
        # no fused multiply-adds across the terms (Triton fuses them by default; Inductor's C++
        # does not): with them, a term at coefficient 0 beside a row would change which product
        # is rounded, and a row's bits would depend on its neighbours' samplers
        options = {"emulate_precision_casts": True} if hasattr(_inductor_config(), "emulate_precision_casts") else {}
        _compiled_update = torch.compile(update, options=options)
    return _compiled_update


class Sampler:
    """The common part of every sampler: timesteps, per-row coefficients and the sampling loop.

    A sampler is its coefficients: subclasses set `name` (their registry key), `needs_noise`
    and `multistep`, and implement `_mix` (the coefficients of `update`'s terms from the signal
    levels of the step) and `terms`. clip_x0 clips x̂₀ to [-1, 1]; thresholding replaces that by
    dynamic thresholding (every sampler, as diffusers' schedulers with `thresholding: true`).
    Coefficients are computed on the host in float64 (x̂₀'s s0 and s1 from alpha_bar in float32,
    as diffusers computes them), then cast to float32 (float64 for float64 rows), by the same
    function for `step`, `sample` and the engine's tables (`coefficient_table`).
    """

    name: str = ""
    needs_noise: bool = False  # whether its steps add fresh noise at non-final steps
    multistep: bool = False  # whether a step reads the previous step's x̂₀ (see the module docstring)

    def __init__(self, schedule: NoiseSchedule, clip_x0: bool = True, thresholding: Thresholding | None = None) -> None:
        self.schedule = schedule
        self.clip_x0 = clip_x0
        self.thresholding = thresholding
        self.update: Callable[..., tuple[Tensor, Tensor]] = update  # or compiled_update() (`compile`)
        self.compiled = False
        # alpha_bar_t on the host in float64, then 1.0 at index T (the level "before" x_0)
        a = schedule.alphas_cumprod.detach().to("cpu", torch.float64)
        self._levels = torch.cat([a, a.new_ones(1)])

    # --- to be provided by subclasses ------------------------------------------------------------
    def _mix(self, a_t: Tensor, a_prev: Tensor, last: Tensor, a_last: Tensor, first: Tensor) -> dict[int, Tensor]:
        """{column: [N] float64} for the columns of `update` this sampler uses besides s0, s1, lo
        and hi: a_t, a_prev, a_last are alpha_bar at t, t_prev and t_last (1 where t_prev is
        LAST or t_last is NO_HISTORY), last and first the [N] bool masks of those cases."""
        raise NotImplementedError

    @property
    def terms(self) -> frozenset[str]:
        """The optional terms of `update` its steps use."""
        raise NotImplementedError

    def timesteps(self, steps: int) -> list[int]:
        """The timesteps a `steps`-step run visits, descending."""
        return respaced_timesteps(self.schedule.num_timesteps, steps)

    # --- shared ----------------------------------------------------------------------------------
    def compile(self) -> Sampler:
        """Step through the compiled update (`compiled_update`) and draw through the compiled draw
        (`ImageNoise.with_compiled_draws`), as an engine that compiles does."""
        self.update = compiled_update()
        self.compiled = True
        return self

    @property
    def limits_x0(self) -> bool:
        """Whether x̂₀ is clipped or thresholded (not the network's own prediction)."""
        return self.clip_x0 or self.thresholding is not None

    @property
    def _limit_terms(self) -> frozenset[str]:
        return frozenset({"clip"} if self.clip_x0 and self.thresholding is None else ())

    def coefficients(
        self,
        t: Tensor | Sequence[int] | int,
        t_prev: Tensor | Sequence[int] | int,
        t_last: Tensor | Sequence[int] | int = NO_HISTORY,
    ) -> Tensor:
        """[N, len(COLUMNS)] float64 on the host: `update`'s coefficients of steps from t to
        t_prev (LAST: to x_0), whose previous step was at t_last (NO_HISTORY: none). Each
        argument is [N] (a tensor anywhere, read to the host, or a list) or an int for every row."""
        t, t_prev, t_last = torch.broadcast_tensors(
            *(torch.as_tensor(v).to("cpu", torch.long) for v in (t, t_prev, t_last))
        )
        T = self.schedule.num_timesteps
        for name, values, lowest in (("t", t, 0), ("t_prev", t_prev, LAST), ("t_last", t_last, NO_HISTORY)):
            if values.numel() and (int(values.min()) < lowest or int(values.max()) >= T):
                raise ValueError(f"{name} must be in [{lowest}, {T}), got {values.unique().tolist()}")
        last, first = t_prev < 0, t_last < 0
        a_t = self._levels[t]
        a_prev = self._levels[torch.where(last, T, t_prev)]
        a_last = self._levels[torch.where(first, T, t_last)]
        out = torch.zeros(*t.shape, len(COLUMNS), dtype=torch.float64)
        # x̂₀'s coefficients from alpha_bar_t in float32, as the schedule's predict_x0 and
        # diffusers' schedulers compute them: the same bits
        a32 = a_t.float()
        out[..., S0], out[..., S1] = a32.sqrt().double(), (1 - a32).sqrt().double()
        bound = 1.0 if "clip" in self._limit_terms else math.inf
        out[..., LO], out[..., HI] = -bound, bound
        for column, values in self._mix(a_t, a_prev, last, a_last, first).items():
            out[..., column] = values
        return out

    def coefficient_table(self, steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """[steps + 1, len(COLUMNS)] on the host: row k the coefficients of a `steps`-step run's
        step k, then a row of zeros (where a finished row's index points). float32 (what the
        engine's float32 rows use) or float64."""
        ts = self.timesteps(steps)
        table = self.coefficients(ts, previous_timesteps(ts), [NO_HISTORY, *ts[:-1]]).to(dtype)
        return torch.cat([table, table.new_zeros(1, len(COLUMNS))])

    def step(
        self,
        model_output: Tensor,
        t: Tensor | int,
        x_t: Tensor,
        noise: Tensor | None = None,
        *,
        t_prev: Tensor | int,
        t_last: Tensor | int = NO_HISTORY,
        history: Tensor | None = None,
    ) -> StepOutput:
        """One step x_t -> x_{t_prev} for every row. model_output: eps [N, C, H, W]; t, t_prev:
        [N] long or int (t_prev = LAST on a row's last step); noise: [N, C, H, W] standard
        normal, required when `needs_noise` unless t_prev is the int LAST (a row at its last
        step adds 0 times its noise). A multistep sampler also takes t_last ([N] long or int,
        NO_HISTORY on a row's first step) and history ([N, C, H, W], the previous step's x̂₀).
        Reads t, t_prev and t_last to the host (the engine gathers its coefficients from tables
        on the device instead)."""
        if self.needs_noise and noise is None and not (isinstance(t_prev, int) and t_prev == LAST):
            raise ValueError(f"{type(self).__name__} needs noise for every step but the last")
        n = x_t.shape[0]
        coef = self.coefficients(t, t_prev, t_last if self.multistep else NO_HISTORY)
        coef = coef.to(_coefficient_dtype(x_t.dtype)).expand(n, len(COLUMNS)).to(x_t.device)
        terms = self.terms - {"history"} if history is None else self.terms
        prev, x0 = self.update(
            x_t, model_output, coef, terms, thresholding=self.thresholding, history=history,
            noise=noise if self.needs_noise else None,
        )  # fmt: skip
        return StepOutput(prev, x0)

    @torch.no_grad()
    def sample(
        self,
        eps_model: EpsModel,
        shape: Sequence[int],
        *,
        steps: int,
        noise: ImageNoise,
        x_T: Tensor | None = None,
        class_labels: Tensor | None = None,
        guidance_scale: float = 1.0,
        guidance_interval: tuple[float, float] | None = None,
        callback: StepCallback | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Run the reverse process from x_T to x_0.

        shape: (C, H, W) of one image; the batch size is len(noise), one (seed, index) per image.
        x_T: optional [N, C, H, W] start (default: noise draw 0). class_labels: [N] long or None.
        guidance_interval: the (low, high] noise levels where guidance_scale applies (the
        model's `guidance_interval`; see guided_timesteps); plain conditional steps elsewhere.
        Step i uses noise draw i + 1. Returns x_0: [N, C, H, W] in dtype, nominally in [-1, 1].
        """
        n = len(noise)
        if n == 0:
            raise ValueError("nothing to sample: the batch is empty")
        if class_labels is not None and class_labels.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
        timesteps = self.timesteps(steps)
        if self.compiled:
            noise = noise.with_compiled_draws()
        if x_T is None:
            x = noise.draw(0, shape, dtype).to(device)
        else:
            if tuple(x_T.shape) != (n, *shape):
                raise ValueError(f"x_T must have shape {(n, *shape)}, got {tuple(x_T.shape)}")
            x = x_T.to(device=device, dtype=dtype)
        labels = None if class_labels is None else class_labels.to(device)
        table = self.coefficient_table(steps, _coefficient_dtype(dtype)).to(device)
        history: Tensor | None = None
        guided = guided_timesteps(self.schedule, guidance_interval)
        for i, (t, t_prev) in enumerate(zip(timesteps, previous_timesteps(timesteps), strict=True)):
            t_rows = torch.full((n,), t, device=device, dtype=torch.long)
            scale = guidance_scale if guided[t] else 1.0
            eps = guided_eps(eps_model, x, t_rows, labels, scale).to(dtype)
            # step i uses noise draw i + 1; the last step adds none
            z = noise.draw(i + 1, shape, dtype).to(device) if self.needs_noise and t_prev != LAST else None
            terms = self.terms - {"history"} if history is None else self.terms
            x, x0 = self.update(
                x, eps, table[i].expand(n, len(COLUMNS)), terms,
                thresholding=self.thresholding, history=history, noise=z,
            )  # fmt: skip
            if self.multistep:
                history = x0
            if callback is not None:
                callback(i, t, x, x0)
        return x


def _coefficient_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 coefficients for float64 rows, else float32 (cast from there to fp16 / bf16 rows:
    the engine's table and `Sampler.sample` agree bit for bit)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DDPMSampler(Sampler):
    """Ancestral sampling, DDPM Algorithm 2, generalised to respaced timesteps.

    variance: "fixed_small" uses sigma_t^2 = posterior variance (beta tilde), "fixed_large"
    uses beta_t (Ho et al. 2020, Sec. 3.2 discuss both).
    """

    name = "ddpm"
    needs_noise = True

    def __init__(
        self,
        schedule: NoiseSchedule,
        variance: VarianceType = "fixed_small",
        clip_x0: bool = True,
        thresholding: Thresholding | None = None,
    ) -> None:
        super().__init__(schedule, clip_x0, thresholding)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        self.variance = variance

    @property
    def terms(self) -> frozenset[str]:
        return self._limit_terms | {"x"}

    def _mix(self, a_t: Tensor, a_prev: Tensor, last: Tensor, a_last: Tensor, first: Tensor) -> dict[int, Tensor]:
        beta_t = 1 - a_t / a_prev  # the respaced beta
        # the posterior mean of q(x_prev | x_t, x0) (DDPM Eq. 7) from x0 predicted by Eq. 15 ...
        mix = {
            C_X0: a_prev.sqrt() * beta_t / (1 - a_t),
            C_X: (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t),
        }
        # ... plus sigma_t * z (DDPM Alg. 2, line 4), except on the last step
        var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20) if self.variance == "fixed_small" else beta_t
        mix[C_Z] = torch.where(last, 0.0, var.sqrt())
        return mix


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta: eta = 0 is deterministic,
    eta = 1 matches DDPM's posterior variance. With clip_x0 (or thresholding) the direction term
    uses the eps that the clipped x0 implies (diffusers: `use_clipped_model_output=True`)."""

    name = "ddim"

    def __init__(
        self, schedule: NoiseSchedule, eta: float = 0.0, clip_x0: bool = True, thresholding: Thresholding | None = None
    ) -> None:
        super().__init__(schedule, clip_x0, thresholding)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = eta
        self.needs_noise = eta > 0

    @property
    def terms(self) -> frozenset[str]:
        # the eps that a clipped x0 implies: a clipped x0 beside the raw eps is a step that agrees
        # with neither, and under classifier-free guidance (an extrapolated eps whose x0 is clipped
        # hard) it walks off the data (docs/quality.md has the measurements)
        return self._limit_terms | {"eps_x0" if self.limits_x0 else "eps"}

    def _mix(self, a_t: Tensor, a_prev: Tensor, last: Tensor, a_last: Tensor, first: Tensor) -> dict[int, Tensor]:
        # sigma_t (DDIM Eq. 16); 0 on the last step, where alpha_bar_prev = 1
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # the direction pointing to x_t, then x_prev (DDIM Eq. 12)
        direction = (1 - a_prev - sigma**2).sqrt()
        return {C_X0: a_prev.sqrt(), (C_EPS_X0 if self.limits_x0 else C_EPS): direction, C_Z: sigma}


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): a deterministic second-order multistep
    solver of the diffusion ODE in data (x_0) prediction, first order on a row's first and last
    step, as diffusers' DPMSolverMultistepScheduler does with its defaults (midpoint solver,
    final sigma 0; thresholding as configured).

    With alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar), lambda = log(alpha / sigma), a
    step from s0 to t with h = lambda_t - lambda_s0 and the previous step's s1, h_0 = lambda_s0
    - lambda_s1:
        x_t = sigma_t / sigma_s0 * x - alpha_t (e^-h - 1) (D0 + D1 / 2),
        D0 = x0_s0, D1 = (h / h_0) (x0_s0 - x0_s1)   (D1 = 0 on a first-order step).
    alpha_t (e^-h - 1) is written alpha_t - (sigma_t / sigma_s0) alpha_s0, which stays finite
    on the last step (sigma_t = 0, lambda_t = inf).
    """

    name = "dpmpp_2m"
    multistep = True

    def __init__(
        self, schedule: NoiseSchedule, clip_x0: bool = False, thresholding: Thresholding | None = None
    ) -> None:
        super().__init__(schedule, clip_x0, thresholding)

    @property
    def terms(self) -> frozenset[str]:
        return self._limit_terms | {"x", "history"}

    def timesteps(self, steps: int) -> list[int]:
        """diffusers' "linspace" spacing: round(linspace(0, T - 1, steps + 1)), descending,
        without the final 0 (the last step goes to x_0). At steps = T that grid would repeat a
        timestep (a zero-length step, then a division by it): every timestep T-1 .. 0 instead."""
        T = self.schedule.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        if steps == T:
            return list(range(T - 1, -1, -1))
        grid = torch.linspace(0, T - 1, steps + 1, dtype=torch.float64).round().long().tolist()
        return grid[::-1][:-1]

    def _mix(self, a_t: Tensor, a_prev: Tensor, last: Tensor, a_last: Tensor, first: Tensor) -> dict[int, Tensor]:
        # a step from s0 (alpha_bar a_t) to t (a_prev), the previous step at s1 (a_last)
        alpha_s0, sigma_s0 = a_t.sqrt(), (1 - a_t).sqrt()
        alpha_t, sigma_t = a_prev.sqrt(), (1 - a_prev).sqrt()
        ratio = sigma_t / sigma_s0
        c_x0 = alpha_t - ratio * alpha_s0  # -alpha_t (e^-h - 1)
        lam = lambda a: 0.5 * (a.log() - (1 - a).log())  # noqa: E731
        h = lam(a_prev) - lam(a_t)
        h_0 = lam(a_t) - lam(a_last)
        second = ~first & ~last & (h_0 > 0)  # first and last steps (and a repeated t) are first order
        return {C_X: ratio, C_X0: c_x0, C_H: torch.where(second, 0.5 * c_x0 * h / h_0, 0.0)}


class DPMSolverPP2MLogSNRSampler(DPMSolverPP2MSampler):
    """DPM-Solver++(2M) on timesteps uniform in log-SNR, lambda_t = log(alpha_t / sigma_t): the
    spacing the DPM-Solver paper recommends for low-resolution images ("logSNR"). `steps`
    targets evenly spaced from lambda_{T-1} towards lambda_0 (the last step goes to x_0), each
    rounded to the nearest of the model's timesteps, then nudged apart so that all `steps` are
    distinct. The solver's coefficients come from the timesteps visited, as in the parent.

    On the demo model at 10 steps (1,000 digits, docs/quality.md) it moves the Fréchet distance
    from 8.9 (linspace) to 7.5 at the same accuracy (0.969); with guidance 3 it is worse (14.8
    against 11.3: fewer of its steps fall in the guidance interval). Made for schedules like the
    linear one: where the last beta is capped (cosine's max_beta), lambda_{T-1} lies far below
    lambda_{T-2} and the first steps bunch at the top. Not diffusers' `use_lu_lambdas`, which
    keeps the continuous sigmas beside rounded timesteps.
    """

    name = "dpmpp_2m_logsnr"

    def timesteps(self, steps: int) -> list[int]:
        T = self.schedule.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in [1, {T}], got {steps}")
        a = self.schedule.alphas_cumprod.double()
        lam = 0.5 * (a.log() - (1 - a).log())  # [T], decreasing in t
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps + 1, dtype=torch.float64)[:-1]
        # nearest timestep to each target: lam is decreasing, so search the increasing -lam
        right = torch.searchsorted(-lam, -targets).clamp(max=T - 1)
        left = (right - 1).clamp(min=0)
        nearer_left = (lam[left] - targets).abs() < (lam[right] - targets).abs()
        ts = torch.where(nearer_left, left, right).tolist()
        for i in range(1, steps):  # strictly decreasing from the top ...
            ts[i] = min(ts[i], ts[i - 1] - 1)
        ts[-1] = max(ts[-1], 0)
        for i in range(steps - 2, -1, -1):  # ... and room for every step below
            ts[i] = max(ts[i], ts[i + 1] + 1)
        return ts
