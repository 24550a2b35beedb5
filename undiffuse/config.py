"""Model configuration, and the one reader of model folders. No torch here.

The HTTP layer validates requests against what a model folder says (image size, classes,
timesteps, prediction type) without loading a network, and the core builds the network from
the same description, so the two can never disagree about a model.

Two folder layouts are understood:

    undiffuse   config.json        {"format": "undiffuse", "version": 1, "unet": {...},
                                    "schedule": {...}, "prediction_type": "epsilon" | "v",
                                    "class_names": [...] | null,
                                    "guidance_interval": [low, high] | null}
                model.safetensors  the EMA weights (what gets served)

    diffusers   config.json        {"_class_name": "UNet2DModel", ...}   (google/ddpm-cifar10-32)
                diffusion_pytorch_model.safetensors (or .bin)
                scheduler_config.json, or ../scheduler/scheduler_config.json (a pipeline folder);
                without either, the DDPM default: linear betas 1e-4..0.02 over 1000 steps
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

PredictionType = Literal["epsilon", "v"]
ScheduleKind = Literal["linear", "cosine"]
ModelFormat = Literal["undiffuse", "diffusers"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A model folder or checkpoint that is missing, truncated or inconsistent; names the file."""


@dataclass(frozen=True)
class ScheduleConfig:
    """What is saved in a checkpoint to rebuild the noise schedule exactly
    (`undiffuse.schedule.NoiseSchedule.from_config`)."""

    kind: ScheduleKind = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4  # linear only
    beta_end: float = 0.02  # linear only
    cosine_s: float = 0.008  # cosine only
    max_beta: float = 0.999  # cosine only

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "cosine"):
            raise ValueError(f"unknown schedule kind {self.kind!r}; expected 'linear' or 'cosine'")
        if self.num_timesteps < 1:
            raise ValueError(f"num_timesteps must be >= 1, got {self.num_timesteps}")


@dataclass(frozen=True)
class UNetConfig:
    """The architecture of `undiffuse.unet.UNet`, saved in every checkpoint."""

    image_size: int = 28
    in_channels: int = 1
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (7,)
    num_heads: int = 4
    dropout: float = 0.1
    num_classes: int | None = None
    norm_groups: int = 8

    def __post_init__(self) -> None:
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {self.in_channels}")
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by the down-sampling factor {factor}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(f"channels {self.base_channels * m} not divisible by norm_groups")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {self.num_classes}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown UNet config fields: {sorted(unknown)}")
        d = dict(d)
        for key in ("channel_mult", "attention_resolutions"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    """An undiffuse model: network, schedule, what the network predicts, class names, and the
    noise levels where classifier-free guidance applies (`guidance_interval`: guidance acts
    where low < sigma_t <= high, sigma_t = sqrt((1 - a_bar_t) / a_bar_t); None: every step).
    """

    unet: UNetConfig
    schedule: ScheduleConfig
    prediction_type: PredictionType = "epsilon"
    class_names: tuple[str, ...] | None = None
    guidance_interval: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_guidance_interval(self.guidance_interval)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "undiffuse",
            "version": FORMAT_VERSION,
            "unet": self.unet.to_dict(),
            "schedule": asdict(self.schedule),
            "prediction_type": self.prediction_type,
            "class_names": list(self.class_names) if self.class_names else None,
            "guidance_interval": list(self.guidance_interval) if self.guidance_interval else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("format") != "undiffuse" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an undiffuse v{FORMAT_VERSION} config (format/version fields)")
        if d.get("prediction_type") not in ("epsilon", "v"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {d.get('prediction_type')!r}")
        names = d.get("class_names")
        interval = d.get("guidance_interval")
        return cls(
            unet=UNetConfig.from_dict(d["unet"]),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction_type=d["prediction_type"],
            class_names=tuple(names) if names else None,
            guidance_interval=_interval_from_json(interval),
        )


def _interval_from_json(value: Any) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(v, (int, float)) for v in value):
        raise ValueError(f"guidance_interval must be [low, high] (two numbers) or null, got {value!r}")
    return (float(value[0]), float(value[1]))


def check_guidance_interval(interval: tuple[float, float] | None) -> None:
    """A ValueError unless interval is None or two finite noise levels 0 <= low < high (None,
    not an infinite bound, means every step)."""
    if interval is None:
        return
    if len(interval) != 2 or not all(math.isfinite(v) for v in interval) or not 0 <= interval[0] < interval[1]:
        raise ValueError(f"guidance_interval must be [low, high] with 0 <= low < high, finite, got {list(interval)}")


@dataclass(frozen=True)
class ModelSpec:
    """What a model folder says about the model in it, read without loading any weights.

    `unet` is the undiffuse architecture (None for a diffusers folder, whose network diffusers
    builds from `raw`). `schedule` and `prediction_type` are what the model was trained with, so
    the HTTP layer validates `steps` against the schedule the sampler will actually run.
    """

    path: Path
    format: ModelFormat
    image_size: int
    channels: int
    num_classes: int | None
    schedule: ScheduleConfig
    prediction_type: PredictionType
    class_names: tuple[str, ...] | None = None
    guidance_interval: tuple[float, float] | None = None
    unet: UNetConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def model_config(self) -> ModelConfig:
        """The undiffuse ModelConfig (undiffuse folders only)."""
        if self.unet is None:
            raise CheckpointError(f"{self.path}: a diffusers folder has no undiffuse ModelConfig")
        return ModelConfig(self.unet, self.schedule, self.prediction_type, self.class_names, self.guidance_interval)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from path, or a CheckpointError naming the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


def read_model_folder(folder: str | Path) -> ModelSpec:
    """Describe the undiffuse or diffusers model in folder; CheckpointError if it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    raw = read_json(folder / CONFIG_FILE)
    if raw.get("_class_name") == "UNet2DModel":
        return _diffusers_spec(folder, raw)
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid config ({e})") from e
    return ModelSpec(
        path=folder,
        format="undiffuse",
        image_size=config.unet.image_size,
        channels=config.unet.in_channels,
        num_classes=config.unet.num_classes,
        schedule=config.schedule,
        prediction_type=config.prediction_type,
        class_names=config.class_names,
        guidance_interval=config.guidance_interval,
        unet=config.unet,
        raw=raw,
    )


def _diffusers_spec(folder: Path, raw: dict[str, Any]) -> ModelSpec:
    schedule, prediction = diffusers_schedule(folder)
    size = raw.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else size
    try:
        image_size, channels = int(size), int(raw.get("in_channels", 3))
        num_classes = raw.get("num_class_embeds")
        num_classes = int(num_classes) if num_classes is not None else None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid UNet2DModel config ({e})") from e
    return ModelSpec(
        path=folder,
        format="diffusers",
        image_size=image_size,
        channels=channels,
        num_classes=num_classes,
        schedule=schedule,
        prediction_type=prediction,
        raw=raw,
    )


_DIFFUSERS_PREDICTION: dict[str, PredictionType] = {"epsilon": "epsilon", "v_prediction": "v"}


def diffusers_schedule(folder: Path) -> tuple[ScheduleConfig, PredictionType]:
    """The schedule and prediction type of a diffusers model folder (see the module docstring)."""
    path = folder / "scheduler_config.json"
    if not path.is_file():
        path = folder.parent / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return ScheduleConfig(), "epsilon"
    cfg = read_json(path)
    kind = cfg.get("beta_schedule", "linear")
    if kind not in ("linear", "squaredcos_cap_v2"):
        raise CheckpointError(f"{path}: unsupported beta_schedule {kind!r}")
    try:
        steps = int(cfg.get("num_train_timesteps", 1000))
        if kind == "linear":
            beta_start, beta_end = float(cfg.get("beta_start", 1e-4)), float(cfg.get("beta_end", 0.02))
            schedule = ScheduleConfig("linear", steps, beta_start, beta_end)
        else:
            schedule = ScheduleConfig("cosine", steps)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid scheduler config ({e})") from e
    prediction = _DIFFUSERS_PREDICTION.get(cfg.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(f"{path}: unsupported prediction_type {cfg.get('prediction_type')!r}")
    return schedule, prediction
