"""Noise schedules and the closed-form forward process q(x_t | x_0).

Every constant is computed once in float64 and cast to the caller's dtype and device at use
(improved-diffusion habit): cumulative products over 1000 steps lose precision in float32.

Notation follows Ho et al. 2020 (DDPM):
    beta_t            variance added at step t
    alpha_t           = 1 - beta_t
    alpha_bar_t       = prod_{s<=t} alpha_s            ("how much signal is left at t")
    posterior var     = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t   (DDPM Eq. 7)
Timesteps are 0-based: t = 0 is the first noising step, t = T - 1 the last.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from undiffuse.config import ScheduleConfig

__all__ = ["NoiseSchedule", "ScheduleConfig"]


class NoiseSchedule:
    """A discrete variance schedule beta_1..beta_T and everything derived from it.

    Attributes (all float64, shape [T]): betas, alphas, alphas_cumprod, alphas_cumprod_prev,
    posterior_variance.
    """

    def __init__(self, betas: Tensor, config: ScheduleConfig | None = None) -> None:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 1:
            raise ValueError("a schedule needs at least one timestep")
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("every beta must lie in (0, 1]")
        self.config = config or ScheduleConfig(kind="linear", num_timesteps=betas.numel())
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        # DDPM Eq. 7: variance of q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self._device_tables: dict[tuple[int, torch.device], Tensor] = {}

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ScheduleConfig) -> NoiseSchedule:
        """The schedule a checkpoint's ScheduleConfig describes."""
        if config.kind == "linear":
            return cls.linear(config.num_timesteps, config.beta_start, config.beta_end)
        if config.kind == "scaled_linear":
            return cls.scaled_linear(config.num_timesteps, config.beta_start, config.beta_end)
        return cls.cosine(config.num_timesteps, config.cosine_s, config.max_beta)

    @classmethod
    def linear(cls, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> NoiseSchedule:
        """Ho et al. 2020, Sec. 4: betas linear from 1e-4 to 0.02 over T = 1000 steps."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        cfg = ScheduleConfig("linear", num_timesteps, beta_start, beta_end)
        return cls(betas, cfg)

    @classmethod
    def scaled_linear(
        cls, num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
    ) -> NoiseSchedule:
        """Latent diffusion (Rombach et al. 2022): sqrt(beta) linear from sqrt(beta_start) to
        sqrt(beta_end), squared (diffusers' "scaled_linear")."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        if not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"need 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
        cfg = ScheduleConfig("scaled_linear", num_timesteps, beta_start, beta_end)
        return cls(betas, cfg)

    @classmethod
    def cosine(cls, num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> NoiseSchedule:
        """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = cos^2((t/T + s)/(1 + s) * pi/2),
        betas = 1 - alpha_bar(t+1)/alpha_bar(t), capped at max_beta."""
        if num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {num_timesteps}")
        steps = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)
        cfg = ScheduleConfig("cosine", num_timesteps, cosine_s=s, max_beta=max_beta)
        return cls(betas, cfg)

    # --- helpers --------------------------------------------------------------------------------
    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def gather(self, values: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """values[t] cast to like's dtype/device and shaped [N, 1, 1, ...] to broadcast over like.

        values: [T] float64 (an attribute of this schedule); t: [N] long or int; like: [N, ...].
        The table is moved to t's device once and cached, so a step on a GPU never copies it.
        """
        if isinstance(t, int):
            return values[t].to(dtype=like.dtype, device=like.device)
        out = self.on_device(values, t.device)[t].to(dtype=like.dtype, device=like.device)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    def on_device(self, values: Tensor, device: torch.device) -> Tensor:
        """values (a [T] table of this schedule) on device, cached. float64, except on devices
        without float64 (MPS), where float32."""
        key = (id(values), device)
        cached = self._device_tables.get(key)
        if cached is None:
            dtype = torch.float32 if device.type == "mps" else torch.float64
            cached = self._device_tables[key] = values.to(device=device, dtype=dtype)
        return cached

    def _check_t(self, t: Tensor | int) -> None:
        lo, hi = (t, t) if isinstance(t, int) else (int(t.min()), int(t.max()))
        if lo < 0 or hi >= self.num_timesteps:
            raise ValueError(f"timestep out of range [0, {self.num_timesteps - 1}]: {lo}..{hi}")

    # --- forward process ------------------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor | int, noise: Tensor | None = None) -> Tensor:
        """Sample x_t ~ q(x_t | x_0) in closed form (DDPM Eq. 4):
        x_t = sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise.

        x0: [N, C, H, W] float; t: [N] long (one timestep per sample) or an int; noise like x0.
        """
        self._check_t(t)
        if noise is None:
            noise = torch.randn_like(x0)
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        a = self.gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor | int, eps: Tensor) -> Tensor:
        """Invert the forward process given predicted noise (DDPM Eq. 15):
        x0 = (x_t - sqrt(1 - alpha_bar_t) * eps) / sqrt(alpha_bar_t).

        x_t, eps: [N, C, H, W]; t: [N] long (a timestep per row) or an int.
        """
        a = self.gather(self.alphas_cumprod, t, x_t)
        return (x_t - (1 - a).sqrt() * eps) / a.sqrt()

    def velocity(self, x0: Tensor, t: Tensor | int, noise: Tensor) -> Tensor:
        """The v-prediction target v = sqrt(a_bar) * eps - sqrt(1 - a_bar) * x0
        (Salimans & Ho 2022, Sec. 4)."""
        a = self.gather(self.alphas_cumprod, t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def eps_from_sample(self, x_t: Tensor, t: Tensor | int, x0: Tensor) -> Tensor:
        """Convert an x_0 prediction to an epsilon prediction: eps = (x_t - sqrt(a_bar) x_0) / sqrt(1 - a_bar)."""
        a = self.gather(self.alphas_cumprod, t, x_t)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()

    def eps_from_velocity(self, x_t: Tensor, t: Tensor | int, v: Tensor) -> Tensor:
        """Convert a v prediction to an epsilon prediction: eps = sqrt(a_bar) v + sqrt(1-a_bar) x_t."""
        a = self.gather(self.alphas_cumprod, t, x_t)
        return a.sqrt() * v + (1 - a).sqrt() * x_t
