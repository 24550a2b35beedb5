"""Latent diffusion: the denoiser works on latents, and a decoder turns finished latents into images.

Two diffusers pipelines are served (`undiffuse.config.LATENT_PIPELINES`):

- LDMPipeline (CompVis/ldm-celebahq-256): an unconditional UNet2DModel on VQModel latents;
- DiTPipeline (facebook/DiT-XL-2-256): a class-conditional DiTTransformer2DModel on AutoencoderKL
  latents, whose output holds the noise prediction and, for learned-variance models, as many
  variance channels, which DiTPipeline drops (its scheduler samples with fixed variances).

Both pipelines decode with `decoder.decode(latents / scaling_factor)` (LDMPipeline divides by the
VQModel's scaling_factor too), which is what `LatentDecoder` does. `DiTDenoiser` adapts the
transformer to the samplers' (x_t, t, class_labels) -> output interface, mapping
`undiffuse.samplers.NULL_CLASS` to DiT's null class id (num_classes: the embedding row trained
with dropped labels, which classifier-free guidance reads as "no class").
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from undiffuse.config import CheckpointError, ModelSpec
from undiffuse.samplers import NULL_CLASS


class DiTDenoiser(nn.Module):
    """DiTTransformer2DModel as (x_t, t, class_labels) -> eps (or v / x_0, as the scheduler says)."""

    def __init__(self, transformer: nn.Module, num_classes: int, latent_channels: int, learned_sigma: bool) -> None:
        super().__init__()
        self.transformer = transformer
        self.num_classes = num_classes
        self.latent_channels = latent_channels
        self.learned_sigma = learned_sigma

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        if class_labels is None:
            raise ValueError("a DiT is class-conditional: class_labels are required")
        labels = torch.where(class_labels == NULL_CLASS, self.num_classes, class_labels)
        out = self.transformer(x, timestep=t, class_labels=labels).sample
        # learned variances ride in the second half of the channels; the samplers use fixed ones
        return out[:, : self.latent_channels] if self.learned_sigma else out


class LatentDecoder(nn.Module):
    """latents [N, c, h, w] -> images [N, C, h * f, w * f], nominally in [-1, 1], as the pipelines
    decode: `autoencoder.decode(latents / scaling_factor).sample` (a VQModel quantizes first)."""

    def __init__(self, autoencoder: nn.Module, scaling_factor: float) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.scaling_factor = scaling_factor

    def forward(self, latents: Tensor) -> Tensor:
        return self.autoencoder.decode(latents / self.scaling_factor).sample


def load_pretrained(cls: type, folder: Path) -> nn.Module:
    """A diffusers model from its folder: local files and safetensors only (a pickled .bin would
    run code as it loads)."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: cannot load diffusers {cls.__name__} ({e})") from e


def load_latent(spec: ModelSpec, unet_adapter: Callable[[nn.Module], nn.Module]) -> tuple[nn.Module, LatentDecoder]:
    """The denoiser (as the samplers call it; a UNet2DModel wrapped by unet_adapter) and the
    decoder of a latent pipeline folder."""
    latent = spec.latent
    if latent is None or spec.network_path is None:
        raise CheckpointError(f"{spec.path}: not a latent pipeline")
    try:
        import diffusers
    except ImportError as e:
        raise CheckpointError(f"{spec.path}: a latent diffusers pipeline; install the 'diffusers' extra") from e
    if latent.denoiser == "UNet2DModel":
        network = unet_adapter(load_pretrained(diffusers.UNet2DModel, spec.network_path))
    else:
        transformer = load_pretrained(diffusers.DiTTransformer2DModel, spec.network_path)
        network = DiTDenoiser(transformer, spec.num_classes or 0, latent.channels, latent.learned_sigma)
    autoencoder = load_pretrained(getattr(diffusers, latent.decoder), latent.decoder_path)
    return network, LatentDecoder(autoencoder, float(autoencoder.config.scaling_factor))
