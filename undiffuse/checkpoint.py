"""Checkpoints: safetensors weights plus a JSON config, and loading diffusers' UNet2DModel.

An undiffuse model folder holds
    config.json        {"format": "undiffuse", "version": 1, "unet": {...}, "schedule": {...},
                        "prediction_type": "epsilon" | "v", "class_names": [...] | null}
    model.safetensors  the EMA weights (what gets served)
A diffusers folder (the layout of google/ddpm-cifar10-32) holds config.json with
"_class_name": "UNet2DModel", diffusion_pytorch_model.safetensors (or .bin) and optionally
scheduler_config.json; loading it needs the optional `diffusers` extra.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from undiffuse.schedule import NoiseSchedule, ScheduleConfig
from undiffuse.unet import UNet, UNetConfig

PredictionType = Literal["epsilon", "v"]
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or does not match its config; names the file."""


@dataclass(frozen=True)
class ModelConfig:
    unet: UNetConfig
    schedule: ScheduleConfig
    prediction_type: PredictionType = "epsilon"
    class_names: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "undiffuse",
            "version": FORMAT_VERSION,
            "unet": self.unet.to_dict(),
            "schedule": asdict(self.schedule),
            "prediction_type": self.prediction_type,
            "class_names": list(self.class_names) if self.class_names else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        if d.get("format") != "undiffuse" or d.get("version") != FORMAT_VERSION:
            raise ValueError(f"not an undiffuse v{FORMAT_VERSION} config (format/version fields)")
        if d.get("prediction_type") not in ("epsilon", "v"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v', got {d.get('prediction_type')!r}")
        names = d.get("class_names")
        return cls(
            unet=UNetConfig.from_dict(d["unet"]),
            schedule=ScheduleConfig(**d["schedule"]),
            prediction_type=d["prediction_type"],
            class_names=tuple(names) if names else None,
        )


class DiffusionModel(nn.Module):
    """A network together with the schedule it was trained on.

    `eps(x_t, t, class_labels)` always returns the predicted noise (converting from v when the
    network predicts v), which is what the samplers consume.
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
        source: str = "",
    ) -> None:
        super().__init__()
        self.network = network
        self.schedule = schedule
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.prediction_type = prediction_type
        self.class_names = class_names
        self.source = source

    @classmethod
    def from_config(
        cls, network: nn.Module, config: ModelConfig, schedule: NoiseSchedule | None = None, source: str = ""
    ) -> DiffusionModel:
        """Wrap an undiffuse UNet with what its ModelConfig says about it."""
        return cls(
            network,
            schedule or config.schedule.build(),
            image_size=config.unet.image_size,
            channels=config.unet.in_channels,
            num_classes=config.unet.num_classes,
            prediction_type=config.prediction_type,
            class_names=config.class_names,
            source=source,
        )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def eps(self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x_t: [N, C, H, W]; t: [N] long; class_labels: [N] long or None -> eps [N, C, H, W]."""
        out = self.network(x_t, t, class_labels)
        if self.prediction_type == "v":
            return self.schedule.eps_from_velocity(x_t, t, out)
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


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


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
    """Load an undiffuse or diffusers UNet2DModel folder, in eval mode on device.

    channels_last stores the convolution weights NHWC, which oneDNN (CPU) and cuDNN (GPU) run
    faster (about 25 % per step for the demo model on a 2-core CPU, see docs/benchmarks.md);
    outputs match the default layout to float round-off.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: model folder not found")
    raw = _read_json(folder / CONFIG_FILE)
    if raw.get("_class_name") == "UNet2DModel":
        return _ready(_load_diffusers(folder, raw, "cpu"), device, channels_last)
    try:
        config = ModelConfig.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_FILE}: invalid config ({e})") from e
    network = UNet(config.unet)
    _load_state(network, _read_safetensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE)
    return _ready(DiffusionModel.from_config(network, config, source=str(folder)), device, channels_last)


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


def _diffusers_schedule(folder: Path) -> tuple[NoiseSchedule, PredictionType]:
    path = folder / "scheduler_config.json"
    if not path.is_file():
        path = folder.parent / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return NoiseSchedule.linear(), "epsilon"
    cfg = _read_json(path)
    kind = cfg.get("beta_schedule", "linear")
    steps = int(cfg.get("num_train_timesteps", 1000))
    if kind == "linear":
        schedule = NoiseSchedule.linear(steps, cfg.get("beta_start", 1e-4), cfg.get("beta_end", 0.02))
    elif kind == "squaredcos_cap_v2":
        schedule = NoiseSchedule.cosine(steps)
    else:
        raise CheckpointError(f"{path}: unsupported beta_schedule {kind!r}")
    pred = {"epsilon": "epsilon", "v_prediction": "v"}.get(cfg.get("prediction_type", "epsilon"))
    if pred is None:
        raise CheckpointError(f"{path}: unsupported prediction_type {cfg.get('prediction_type')!r}")
    return schedule, pred  # type: ignore[return-value]


def _load_diffusers(folder: Path, raw: dict[str, Any], device: torch.device | str) -> DiffusionModel:
    try:
        from diffusers import UNet2DModel
    except ImportError as e:
        raise CheckpointError(
            f"{folder}: a diffusers UNet2DModel folder; install the 'diffusers' extra to load it"
        ) from e
    names = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
    if not any((folder / n).is_file() for n in names):
        raise CheckpointError(f"{folder / names[0]}: missing (nor {names[1]})")
    try:
        unet = UNet2DModel.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{folder}: cannot load diffusers UNet2DModel ({e})") from e
    schedule, prediction = _diffusers_schedule(folder)
    size = raw.get("sample_size", 32)
    size = size[0] if isinstance(size, (list, tuple)) else int(size)
    model = DiffusionModel(
        _DiffusersUNet(unet),
        schedule,
        image_size=size,
        channels=int(raw.get("in_channels", 3)),
        num_classes=raw.get("num_class_embeds"),
        prediction_type=prediction,
        source=str(folder),
    )
    return model
