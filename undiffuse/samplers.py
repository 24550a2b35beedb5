"""Reverse samplers: DDPM ancestral sampling and DDIM, over respaced timesteps.

A sampler knows the schedule, never the network: `sample()` calls any
`eps_model(x_t, t) -> eps` (or `eps_model(x_t, t, class_labels)` for a conditional model), and
`step()` maps (model output, t, x_t, noise) to x_{t_prev} for the whole batch at once.

Timesteps are respaced the way diffusers' "leading" spacing does it, so a 50-step sampler
visits t = 980, 960, ..., 0 of a T = 1000 schedule, and both samplers agree with diffusers'
DDPMScheduler / DDIMScheduler step for step (tests/core/test_diffusers_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from undiffuse.noise import ImageNoise
from undiffuse.schedule import NoiseSchedule

VarianceType = Literal["fixed_small", "fixed_large"]
NULL_CLASS = -1  # the label a conditional model reads as "no class" (classifier-free guidance)


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


class Sampler:
    """The common part of DDPM and DDIM: timesteps, guidance and the sampling loop."""

    def __init__(self, schedule: NoiseSchedule, clip_x0: bool = True) -> None:
        self.schedule = schedule
        self.clip_x0 = clip_x0

    # --- to be provided by subclasses ------------------------------------------------------------
    def step(self, model_output: Tensor, t: int, x_t: Tensor, noise: Tensor | None = None, *, steps: int) -> StepOutput:
        raise NotImplementedError

    def needs_noise(self, t: int) -> bool:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------------
    def _alphas(self, t: int, steps: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha_bar_t, alpha_bar_prev) as scalars of like's dtype; prev of the last step is 1."""
        prev_t = t - self.schedule.num_timesteps // steps
        a_t = self.schedule.alphas_cumprod[t]
        a_prev = self.schedule.alphas_cumprod[prev_t] if prev_t >= 0 else a_t.new_tensor(1.0)
        return a_t.to(like.dtype).to(like.device), a_prev.to(like.dtype).to(like.device)

    def _pred_x0(self, eps: Tensor, x_t: Tensor, a_t: Tensor) -> Tensor:
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        return x0.clamp(-1, 1) if self.clip_x0 else x0

    @staticmethod
    def guided_eps(
        eps_model: EpsModel,
        x_t: Tensor,
        t: Tensor,
        class_labels: Tensor | None,
        guidance_scale: float,
    ) -> Tensor:
        """Classifier-free guidance (Ho & Salimans 2022): eps_u + w * (eps_c - eps_u).

        w = 1 is plain conditional sampling (one network call); w != 1 evaluates the
        conditional and unconditional halves in one batch of 2N.
        """
        if class_labels is None:
            return eps_model(x_t, t)
        if guidance_scale == 1.0:
            return eps_model(x_t, t, class_labels)
        null = torch.full_like(class_labels, NULL_CLASS)
        both = eps_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([class_labels, null]))
        eps_c, eps_u = both.chunk(2)
        return eps_u + guidance_scale * (eps_c - eps_u)

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
        callback: StepCallback | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Run the reverse process from x_T to x_0.

        shape: (C, H, W) of one image; the batch size is len(noise), one (seed, index) per image.
        x_T: optional [N, C, H, W] start (default: noise draw 0). class_labels: [N] long or None.
        Returns x_0: [N, C, H, W] in dtype, nominally in [-1, 1].
        """
        n = len(noise)
        if n == 0:
            raise ValueError("nothing to sample: the batch is empty")
        if class_labels is not None and class_labels.shape != (n,):
            raise ValueError(f"class_labels must have shape ({n},), got {tuple(class_labels.shape)}")
        timesteps = respaced_timesteps(self.schedule.num_timesteps, steps)
        if x_T is None:
            x = noise.draw(0, shape, dtype).to(device)
        else:
            if tuple(x_T.shape) != (n, *shape):
                raise ValueError(f"x_T must have shape {(n, *shape)}, got {tuple(x_T.shape)}")
            x = x_T.to(device=device, dtype=dtype)
        labels = None if class_labels is None else class_labels.to(device)
        for i, t in enumerate(timesteps):
            t_batch = torch.full((n,), t, device=device, dtype=torch.long)
            eps = self.guided_eps(eps_model, x, t_batch, labels, guidance_scale).to(dtype)
            z = noise.draw(i + 1, shape, dtype).to(device) if self.needs_noise(t) else None
            out = self.step(eps, t, x, z, steps=steps)
            x = out.prev_sample
            if callback is not None:
                callback(i, t, x, out.pred_x0)
        return x


class DDPMSampler(Sampler):
    """Ancestral sampling, DDPM Algorithm 2, generalised to respaced timesteps.

    variance: "fixed_small" uses sigma_t^2 = posterior variance (beta tilde), "fixed_large"
    uses beta_t (Ho et al. 2020, Sec. 3.2 discuss both).
    """

    def __init__(self, schedule: NoiseSchedule, variance: VarianceType = "fixed_small", clip_x0: bool = True) -> None:
        super().__init__(schedule, clip_x0)
        if variance not in ("fixed_small", "fixed_large"):
            raise ValueError(f"variance must be 'fixed_small' or 'fixed_large', got {variance!r}")
        self.variance = variance

    def needs_noise(self, t: int) -> bool:
        return t > 0

    def step(
        self,
        model_output: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        *,
        steps: int | None = None,
    ) -> StepOutput:
        """One ancestral step x_t -> x_{t_prev}.

        model_output: predicted eps [N, C, H, W]; t: the current timestep; noise: [N, C, H, W]
        standard normal (required when t > 0); steps: the sampler's step count (default T).
        """
        steps = steps or self.schedule.num_timesteps
        a_t, a_prev = self._alphas(t, steps, x_t)
        beta_t = 1 - a_t / a_prev  # the respaced beta
        # 1. predict x0 (DDPM Eq. 15), optionally clipped to the data range
        x0 = self._pred_x0(model_output, x_t, a_t)
        # 2. posterior mean of q(x_prev | x_t, x0) (DDPM Eq. 7)
        coef_x0 = a_prev.sqrt() * beta_t / (1 - a_t)
        coef_xt = (1 - beta_t).sqrt() * (1 - a_prev) / (1 - a_t)
        mean = coef_x0 * x0 + coef_xt * x_t
        if t == 0:
            return StepOutput(mean, x0)
        # 3. add sigma_t * z (DDPM Alg. 2, line 4)
        if noise is None:
            raise ValueError("DDPM needs noise for every step with t > 0")
        if self.variance == "fixed_small":
            var = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
        else:
            var = beta_t
        return StepOutput(mean + var.sqrt() * noise, x0)


class DDIMSampler(Sampler):
    """DDIM (Song et al. 2021, Eq. 12) with stochasticity eta: eta = 0 is deterministic,
    eta = 1 matches DDPM's posterior variance."""

    def __init__(self, schedule: NoiseSchedule, eta: float = 0.0, clip_x0: bool = True) -> None:
        super().__init__(schedule, clip_x0)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.eta = eta

    def needs_noise(self, t: int) -> bool:
        return self.eta > 0

    def step(
        self,
        model_output: Tensor,
        t: int,
        x_t: Tensor,
        noise: Tensor | None = None,
        *,
        steps: int,
    ) -> StepOutput:
        """One DDIM step x_t -> x_{t_prev}, t_prev = t - T // steps.

        model_output: predicted eps [N, C, H, W]; noise: [N, C, H, W], required when eta > 0.
        """
        a_t, a_prev = self._alphas(t, steps, x_t)
        # 1. predict x0 (DDIM Eq. 12, "predicted x0")
        x0 = self._pred_x0(model_output, x_t, a_t)
        # 2. sigma_t (DDIM Eq. 16)
        sigma = self.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
        # 3. direction pointing to x_t, then x_prev (DDIM Eq. 12)
        direction = (1 - a_prev - sigma**2).sqrt() * model_output
        prev = a_prev.sqrt() * x0 + direction
        if self.eta > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs noise for every step")
            prev = prev + sigma * noise
        return StepOutput(prev, x0)
