"""Checkpoints: safetensors weights plus a JSON config, and loading diffusers' UNet2DModel.

What a model folder holds, and how it is read without torch, is `undiffuse.config`; this module
turns a folder into a network with weights (`load_model`) and writes one (`save_model`).
Loading a diffusers folder needs the optional `diffusers` extra.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from undiffuse.config import (
    CONFIG_FILE,
    DIFFUSERS_WEIGHTS,
    WEIGHTS_FILE,
    CheckpointError,
    ModelConfig,
    ModelSpec,
    PredictionType,
    Thresholding,
    read_model_folder,
)
from undiffuse.invariance import decode_in_slices, default_rows, in_slices
from undiffuse.latent import LatentDecoder, load_latent, load_pretrained
from undiffuse.registry import make_sampler
from undiffuse.samplers import Sampler
from undiffuse.schedule import NoiseSchedule
from undiffuse.unet import UNet

__all__ = ["CheckpointError", "DiffusionModel", "ModelConfig", "load_model", "save_model"]


class DiffusionModel(nn.Module):
    """A network together with the schedule it was trained on.

    `eps(x_t, t, class_labels)` always returns the predicted noise (converting from v when the
    network predicts v), which is what the samplers consume.

    A latent model (`decoder` set) denoises latents of `sample_shape` and makes images of
    `image_shape` with `decode`; for a pixel model the two shapes are the same and `decode` is
    the identity, so `model.decode(sampler.sample(model.eps, model.sample_shape, ...))` is an
    image for either.
    """

    def __init__(
        self,
        network: nn.Module,
        schedule: NoiseSchedule,
        *,
        image_size: int,
        channels: int,
        num_classes: int | None,
        prediction_type: PredictionType = "epsilon",
        class_names: tuple[str, ...] | None = None,
        guidance_interval: tuple[float, float] | None = None,
        clip_sample: bool | None = None,
        thresholding: Thresholding | None = None,
        source: str = "",
        decoder: LatentDecoder | None = None,
        latent_shape: tuple[int, int, int] | None = None,
        guidable: bool | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.prediction_type = prediction_type
        self.class_names = class_names
        self.guidance_interval = guidance_interval  # sigma bounds where guidance acts (None: all)
        self.clip_sample = clip_sample  # DDPM/DDIM clip x0 to [-1, 1] (None: the samplers' default)
        self.thresholding = thresholding  # dynamic thresholding of x0 instead (None: off)
        self.source = source
        if (decoder is None) != (latent_shape is None):
            raise ValueError("a latent model needs both its decoder and its latent shape")
        self.decoder = decoder
        self.latent_shape = latent_shape
        # classifier-free guidance needs a "no class" input (ModelSpec.guidable); None: any conditional model
        self.guidable = num_classes is not None if guidable is None else guidable
        # rows per network call (undiffuse.invariance); None: the device's default
        self.invariant_rows: int | None = None

    @classmethod
    def from_config(
        cls, network: nn.Module, config: ModelConfig, schedule: NoiseSchedule | None = None, source: str = ""
    ) -> DiffusionModel:
        """Wrap an undiffuse UNet with what its ModelConfig says about it."""
        return cls(
            network,
            schedule or NoiseSchedule.from_config(config.schedule),
            image_size=config.unet.image_size,
            channels=config.unet.in_channels,
            num_classes=config.unet.num_classes,
            prediction_type=config.prediction_type,
            class_names=config.class_names,
            guidance_interval=config.guidance_interval,
            source=source,
        )

    @classmethod
    def from_spec(cls, network: nn.Module, spec: ModelSpec, decoder: LatentDecoder | None = None) -> DiffusionModel:
        """Wrap any network (and a latent model's decoder) with what its model folder says about it."""
        return cls(
            network,
            NoiseSchedule.from_config(spec.schedule),
            image_size=spec.image_size,
            channels=spec.channels,
            num_classes=spec.num_classes,
            prediction_type=spec.prediction_type,
            class_names=spec.class_names,
            guidance_interval=spec.guidance_interval,
            clip_sample=spec.clip_sample,
            thresholding=spec.thresholding,
            source=str(spec.path),
            decoder=decoder,
            latent_shape=spec.latent.shape if spec.latent else None,
            guidable=spec.guidable,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the model makes."""
        return (self.channels, self.image_size, self.image_size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the samplers denoise: the latents of a latent model, else the image."""
        return self.latent_shape or self.image_shape

    @property
    def is_latent(self) -> bool:
        return self.decoder is not None

    def decode(self, x0: Tensor) -> Tensor:
        """Denoised samples [N, *sample_shape] -> images [N, *image_shape], nominally in [-1, 1]
        (the identity for a pixel model). Batch-invariant (one image per decoder call) where
        eps is (`rows_for`)."""
        if self.decoder is None:
            return x0
        return decode_in_slices(self.decoder, x0, 1) if self.rows_for(x0.device) else self.decoder(x0)

    def rows_for(self, device: torch.device) -> int:
        """Rows per network call on device: `invariant_rows`, or the device's default
        (undiffuse.invariance.default_rows; 0: whole batches)."""
        return self.invariant_rows if self.invariant_rows is not None else default_rows(device)

    def make_sampler(self, name: str, **options: Any) -> Sampler:
        """A sampler by registry name for this model: its schedule, and x̂₀ clipped or thresholded
        as its folder's scheduler says (`undiffuse.registry.make_sampler`)."""
        return make_sampler(
            name, self.schedule, clip_sample=self.clip_sample, thresholding=self.thresholding, **options
        )

    def eps(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x_t: [N, C, H, W]; t: [N] long; class_labels: [N] long or None -> eps [N, C, H, W].
        The network runs on slices of `rows_for(device)` rows, so that a row's eps does not depend
        on the rest of the batch (undiffuse.invariance)."""
        out = in_slices(self.network, x_t, t, class_labels, self.rows_for(x_t.device))
        return self.eps_from_output(x_t, t, out)

    def eps_from_output(self, x_t: Tensor, t: Tensor, out: Tensor) -> Tensor:
        """The network's output as predicted noise (converted from v or x_0 for a model that
        predicts those)."""
        if self.prediction_type == "v":
            return self.schedule.eps_from_velocity(x_t, t, out)
        if self.prediction_type == "sample":
            return self.schedule.eps_from_sample(x_t, t, out)
        return out


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(folder: str | Path, state_dict: dict[str, Tensor], config: ModelConfig) -> Path:
    """Write config.json and model.safetensors into folder (each atomically)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    _atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(config.to_dict(), indent=2) + "\n"
    _atomic_write(folder / CONFIG_FILE, lambda p: Path(p).write_text(text))
    return folder


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({e})") from e


def _load_state(module: nn.Module, state: dict[str, Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensors (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} shape mismatches (e.g. {k}: file {tuple(state[k].shape)}, "
                f"config {tuple(expected[k].shape)})"
            )
        raise CheckpointError(f"{path}: weights do not match config.json: {'; '.join(parts)}")
    module.load_state_dict(state)


def load_model(folder: str | Path, device: torch.device | str = "cpu", channels_last: bool = True) -> DiffusionModel:
    """Load an undiffuse model, a diffusers UNet2DModel folder or a diffusers pipeline (pixel or
    latent: `undiffuse.config`), in eval mode on device.

    channels_last stores the convolution weights NHWC, which oneDNN (CPU) and cuDNN (GPU) run
    faster (about 25 % per step for the demo model on a 2-core CPU, see docs/benchmarks.md);
    outputs match the default layout to float round-off.
    """
    spec = read_model_folder(folder)
    if spec.format == "diffusers":
        return _ready(_load_diffusers(spec), device, channels_last)
    network = UNet(spec.unet)
    weights = spec.path / WEIGHTS_FILE
    _load_state(network, _read_safetensors(weights), weights)
    return _ready(DiffusionModel.from_spec(network, spec), device, channels_last)


def _ready(model: DiffusionModel, device: torch.device | str, channels_last: bool) -> DiffusionModel:
    model = model.to(device).eval()
    return model.to(memory_format=torch.channels_last) if channels_last else model


class _DiffusersUNet(nn.Module):
    """Adapts diffusers' UNet2DModel to the (x_t, t, class_labels) -> output interface."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        return self.unet(x, t, class_labels=class_labels).sample


def _load_diffusers(spec: ModelSpec) -> DiffusionModel:
    if spec.latent is not None:
        network, decoder = load_latent(spec, _DiffusersUNet)
        return DiffusionModel.from_spec(network, spec, decoder)
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise CheckpointError(
            f"{spec.path}: a diffusers UNet2DModel folder; install the 'diffusers' extra to load it"
        ) from e
    folder = spec.network_path or spec.path
    if not (folder / DIFFUSERS_WEIGHTS).is_file():
        raise CheckpointError(f"{folder / DIFFUSERS_WEIGHTS}: missing")
    return DiffusionModel.from_spec(_DiffusersUNet(load_pretrained(UNet2DModel, folder)), spec)
