"""undiffuse: denoising diffusion (DDPM, DDIM) in PyTorch, and a client of the undiffuse service.

from undiffuse import NoiseSchedule, DDPMSampler, DDIMSampler, ImageNoise, load_model, make_sampler
from undiffuse.client import Client, AsyncClient

The names below are imported on first use (PEP 562), so that `import undiffuse.config`,
`undiffuse.registry` (what the torch-free HTTP layer reads) or `undiffuse.client` (installed
without torch: the `diffusion` extra brings it) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CheckpointError": "undiffuse.config",
    "ModelConfig": "undiffuse.config",
    "ModelSpec": "undiffuse.config",
    "ScheduleConfig": "undiffuse.config",
    "UNetConfig": "undiffuse.config",
    "read_model_folder": "undiffuse.config",
    "SAMPLERS": "undiffuse.registry",
    "make_sampler": "undiffuse.registry",
    "DiffusionModel": "undiffuse.checkpoint",
    "load_model": "undiffuse.checkpoint",
    "save_model": "undiffuse.checkpoint",
    "ImageNoise": "undiffuse.noise",
    "DDIMSampler": "undiffuse.samplers",
    "DDPMSampler": "undiffuse.samplers",
    "Sampler": "undiffuse.samplers",
    "StepOutput": "undiffuse.samplers",
    "respaced_timesteps": "undiffuse.samplers",
    "NoiseSchedule": "undiffuse.schedule",
    "UNet": "undiffuse.unet",
}
__all__ = [
    "CheckpointError",
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionModel",
    "ImageNoise",
    "ModelConfig",
    "ModelSpec",
    "NoiseSchedule",
    "SAMPLERS",
    "Sampler",
    "ScheduleConfig",
    "StepOutput",
    "UNet",
    "UNetConfig",
    "load_model",
    "make_sampler",
    "read_model_folder",
    "respaced_timesteps",
    "save_model",
]
__version__ = "0.1.0"
_SUBMODULES = {
    "checkpoint",
    "cli",
    "client",
    "client_cli",
    "config",
    "data",
    "engine",
    "images",
    "noise",
    "registry",
    "samplers",
    "schedule",
    "training",
    "unet",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:  # `import undiffuse; undiffuse.samplers.DDIMSampler`
            return importlib.import_module(f"undiffuse.{name}")
        raise AttributeError(f"module 'undiffuse' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:
    from undiffuse.checkpoint import DiffusionModel, load_model, save_model
    from undiffuse.config import CheckpointError, ModelConfig, ModelSpec, ScheduleConfig, UNetConfig, read_model_folder
    from undiffuse.noise import ImageNoise
    from undiffuse.registry import SAMPLERS, make_sampler
    from undiffuse.samplers import DDIMSampler, DDPMSampler, Sampler, StepOutput, respaced_timesteps
    from undiffuse.schedule import NoiseSchedule
    from undiffuse.unet import UNet
