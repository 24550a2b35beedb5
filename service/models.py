"""The served models, described from their config.json files alone (no torch import), so the
HTTP layer can validate requests without loading a network."""

from __future__ import annotations

import json
from pathlib import Path

from service.schemas import ModelInfo


class ModelRegistry:
    """Every sub-folder of model_dir with a readable config.json is a model named after it."""

    def __init__(self, model_dir: Path, default: str) -> None:
        self.model_dir = Path(model_dir)
        self.default = default
        self.models: dict[str, ModelInfo] = {}
        for config in sorted(self.model_dir.glob("*/config.json")):
            info = describe(config, default=config.parent.name == default)
            self.models[info.name] = info
        if default not in self.models:
            raise ValueError(f"default model {default!r} not found in {self.model_dir}")

    def path(self, name: str) -> Path:
        return self.model_dir / name

    def get(self, name: str | None) -> ModelInfo | None:
        return self.models.get(name or self.default)


def describe(config_path: Path, default: bool = False) -> ModelInfo:
    """Read an undiffuse or diffusers UNet2DModel config.json into a ModelInfo."""
    raw = json.loads(config_path.read_text())
    name = config_path.parent.name
    if raw.get("_class_name") == "UNet2DModel":
        size = raw.get("sample_size", 32)
        sched = config_path.parent / "scheduler_config.json"
        steps = json.loads(sched.read_text()).get("num_train_timesteps", 1000) if sched.is_file() else 1000
        return ModelInfo(
            name=name,
            image_size=size[0] if isinstance(size, list) else int(size),
            channels=int(raw.get("in_channels", 3)),
            num_classes=raw.get("num_class_embeds"),
            num_timesteps=steps,
            prediction_type="epsilon",
            default=default,
        )
    unet = raw["unet"]
    return ModelInfo(
        name=name,
        image_size=unet["image_size"],
        channels=unet["in_channels"],
        num_classes=unet.get("num_classes"),
        class_names=raw.get("class_names"),
        num_timesteps=raw["schedule"]["num_timesteps"],
        prediction_type=raw["prediction_type"],
        default=default,
    )
