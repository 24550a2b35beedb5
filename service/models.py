"""The served models, described by undiffuse.config from their folders alone (no torch), so the
HTTP layer validates requests against exactly what the Denoiser will load."""

from __future__ import annotations

from pathlib import Path

from undiffuse.config import CONFIG_FILE, ModelSpec, read_model_folder


class ModelRegistry:
    """Every sub-folder of model_dir with a config.json is a model named after the folder."""

    def __init__(self, model_dir: Path, default: str) -> None:
        self.model_dir = Path(model_dir)
        self.default = default
        self.models: dict[str, ModelSpec] = {
            config.parent.name: read_model_folder(config.parent)
            for config in sorted(self.model_dir.glob(f"*/{CONFIG_FILE}"))
        }
        if default not in self.models:
            raise ValueError(f"default model {default!r} not found in {self.model_dir}")

    def get(self, name: str | None) -> ModelSpec | None:
        return self.models.get(name or self.default)
