"""undiffuse: denoising diffusion (DDPM, DDIM) in PyTorch.

from undiffuse import NoiseSchedule, DDPMSampler, DDIMSampler, ImageNoise, load_model
"""

from undiffuse.checkpoint import CheckpointError, DiffusionModel, ModelConfig, load_model, save_model
from undiffuse.noise import ImageNoise
from undiffuse.samplers import DDIMSampler, DDPMSampler, StepOutput, respaced_timesteps
from undiffuse.schedule import NoiseSchedule, ScheduleConfig
from undiffuse.unet import UNet, UNetConfig

__all__ = [
    "CheckpointError",
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionModel",
    "ImageNoise",
    "ModelConfig",
    "NoiseSchedule",
    "ScheduleConfig",
    "StepOutput",
    "UNet",
    "UNetConfig",
    "load_model",
    "respaced_timesteps",
    "save_model",
]
__version__ = "0.1.0"
