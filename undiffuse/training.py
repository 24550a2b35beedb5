"""Noise-prediction training (DDPM Algorithm 1) with AdamW, an EMA of the weights, gradient
clipping, mixed precision on a GPU, periodic checkpoints with sample grids, and resume.

Layout of a training run folder:
    model/                 the served checkpoint (EMA weights + config.json), rewritten each time
    training_state.pt      raw weights, EMA, optimizer, step: what `resume` reads
    samples/step_NNNNNN.png
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from undiffuse.checkpoint import DiffusionModel, save_model
from undiffuse.config import ModelConfig, PredictionType
from undiffuse.images import make_grid, save_png
from undiffuse.noise import ImageNoise
from undiffuse.samplers import NULL_CLASS, DDIMSampler
from undiffuse.schedule import NoiseSchedule
from undiffuse.unet import UNet

STATE_FILE = "training_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 8000
    batch_size: int = 64
    lr: float = 5e-4
    warmup_steps: int = 200
    lr_decay: Literal["constant", "cosine"] = "constant"  # cosine: lr -> 0 at `steps`
    weight_decay: float = 0.0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    label_dropout: float = 0.1  # fraction of labels replaced by the null class (for CFG)
    checkpoint_every: int = 1000
    sample_steps: int = 50  # DDIM steps for the checkpoint grids
    seed: int = 0
    # auto: bf16 (fp16 where bf16 is missing) autocast on CUDA, fp32 on the CPU; bf16: bf16 autocast
    # on any device (1.5x per step on a CPU with AMX, docs/training.md); no: fp32 everywhere
    mixed_precision: Literal["auto", "no", "bf16"] = "auto"

    def __post_init__(self) -> None:
        if self.lr_decay not in ("constant", "cosine"):
            raise ValueError(f"lr_decay must be 'constant' or 'cosine', got {self.lr_decay!r}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise ValueError(f"mixed_precision must be 'auto', 'no' or 'bf16', got {self.mixed_precision!r}")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """The multiplier of cfg.lr at an absolute optimizer step: a linear warm-up, then constant or
    a cosine to 0 at cfg.steps. It depends on the step and this run's settings only, so a run
    resumed with the same --steps continues on its curve; a different --steps moves the cosine's
    end, and the rate jumps to the new curve's value at the resumed step."""
    warmup = max(1, cfg.warmup_steps)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.lr_decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def diffusion_loss(
    network: torch.nn.Module,
    schedule: NoiseSchedule,
    x0: Tensor,
    labels: Tensor | None,
    prediction_type: PredictionType = "epsilon",
) -> Tensor:
    """DDPM Algorithm 1: t ~ U{0..T-1}, eps ~ N(0, I), MSE(target, network(x_t, t)).

    x0: [N, C, H, W] in [-1, 1]; labels: [N] long (NULL_CLASS for dropped) or None.
    The target is eps, or v = sqrt(a_bar) eps - sqrt(1 - a_bar) x0 for v-prediction.
    """
    n = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (n,), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = schedule.q_sample(x0, t, noise)
    targets = {"epsilon": lambda: noise, "v": lambda: schedule.velocity(x0, t, noise), "sample": lambda: x0}
    target = targets[prediction_type]()
    out = network(x_t, t, labels)
    return F.mse_loss(out.float(), target)


class Trainer:
    def __init__(
        self,
        out_dir: str | Path,
        model_config: ModelConfig,
        train_config: TrainConfig,
        device: torch.device | str = "cpu",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.model_config = model_config
        self.cfg = train_config
        self.device = torch.device(device)
        self.schedule = NoiseSchedule.from_config(model_config.schedule)
        torch.manual_seed(train_config.seed)
        self.network = UNet(model_config.unet).to(self.device)
        self.ema = AveragedModel(
            self.network, multi_avg_fn=get_ema_multi_avg_fn(train_config.ema_decay), use_buffers=True
        )
        self.optimizer = torch.optim.AdamW(
            self.network.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, train_config))
        self.step = 0
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(enabled=self.amp_dtype == torch.float16)

    def _amp_dtype(self) -> torch.dtype | None:
        if self.cfg.mixed_precision == "bf16":
            if self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
                # CUDA autocast would switch itself off with a warning and train in fp32
                raise ValueError("mixed_precision 'bf16': this GPU has no bf16; use 'auto' (fp16) or 'no'")
            return torch.bfloat16
        if self.cfg.mixed_precision == "no" or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    # --- state ----------------------------------------------------------------------------------
    def save(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_model(self.out_dir / "model", self.ema.module.state_dict(), self.model_config)
        state = {
            "step": self.step,
            "network": self.network.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
        }
        tmp = self.out_dir / (STATE_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(self.out_dir / STATE_FILE)

    def resume(self) -> bool:
        """Load training_state.pt if the run folder has one; returns whether it did."""
        path = self.out_dir / STATE_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.network.load_state_dict(state["network"])
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if state["scaler"]:  # empty when the saving run had no fp16 scaler (CPU, bf16 or fp32)
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step = int(state["step"])
        # --lr may differ from the run's first: the curve continues from this run's base lr, at
        # the optimizer's step (a state whose schedule was restarted may count from elsewhere).
        self.lr_schedule.base_lrs = [self.cfg.lr for _ in self.optimizer.param_groups]
        self.lr_schedule.last_epoch = self.step
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.lr * lr_factor(self.step, self.cfg)
        return True

    # --- loop -----------------------------------------------------------------------------------
    def train_step(self, x0: Tensor, labels: Tensor | None) -> Tensor:
        """One optimizer step; returns the loss as a 0-d tensor on the device (reading it as a
        number waits for the device, so `fit` reads it only every `log_every` steps)."""
        self.network.train()
        if labels is not None and self.cfg.label_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cfg.label_dropout
            labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
        with torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        ):
            loss = diffusion_loss(self.network, self.schedule, x0, labels, self.model_config.prediction_type)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_schedule.step()
        self.ema.update_parameters(self.network)
        self.step += 1
        return loss.detach()

    def fit(
        self,
        images: Tensor,
        labels: Tensor | None,
        progress: bool = True,
        max_seconds: float | None = None,
        log_every: int = 50,
    ) -> None:
        """Train until cfg.steps on images [N, C, H, W] in [-1, 1] (+ labels [N]), or until
        max_seconds of wall time have passed: then it stops at the step it reached and saves
        (the learning-rate curve still ends at cfg.steps, so it stops part-way down it)."""
        from tqdm import tqdm

        if self.model_config.unet.num_classes is not None and labels is None:
            raise ValueError("a class-conditional model needs labels")
        if labels is not None and self.model_config.unet.num_classes is not None:
            if int(labels.min()) < 0 or int(labels.max()) >= self.model_config.unet.num_classes:
                raise ValueError("labels out of range for the model's num_classes")
        images = images.to(self.device)
        labels = labels.to(self.device) if labels is not None and self.model_config.unet.num_classes else None
        gen = torch.Generator(device="cpu").manual_seed(self.cfg.seed + self.step)
        bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not progress, unit="it", dynamic_ncols=True)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        losses: list[Tensor] = []
        while self.step < self.cfg.steps:
            idx = torch.randint(0, images.shape[0], (self.cfg.batch_size,), generator=gen)
            if self.device.type == "cuda":  # a pageable copy would wait for the device every step
                idx = idx.pin_memory().to(self.device, non_blocking=True)
            else:
                idx = idx.to(self.device)
            losses.append(self.train_step(images[idx], labels[idx] if labels is not None else None))
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if len(losses) >= log_every or out_of_time or self.step == self.cfg.steps:
                bar.update(len(losses))
                bar.set_postfix(loss=f"{float(torch.stack(losses).mean()):.4f}", refresh=False)
                losses = []
            if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps or out_of_time:
                self.save()
                self.write_grid()
            if out_of_time:
                break
        bar.close()

    def served_model(self) -> DiffusionModel:
        return DiffusionModel.from_config(self.ema.module, self.model_config, self.schedule)

    @torch.no_grad()
    def write_grid(self) -> Path:
        """A sample grid from the EMA weights: one row per class (10 each), or 8 x 8."""
        model = self.served_model().eval()
        k = model.num_classes
        if k:
            per_row = 10
            labels = torch.arange(k, device=self.device).repeat_interleave(per_row)
        else:
            per_row, labels = 8, None
        n = labels.numel() if labels is not None else 64
        sampler = DDIMSampler(self.schedule, eta=0.0)
        x = sampler.sample(
            model.eps,
            model.image_shape,
            steps=min(self.cfg.sample_steps, self.schedule.num_timesteps),
            noise=ImageNoise.for_request(self.cfg.seed, n, self.device),
            class_labels=labels,
            device=self.device,
        )
        return save_png(make_grid(x, nrow=per_row), self.out_dir / "samples" / f"step_{self.step:06d}.png")
