"""The served models, described by undiffuse.config from their folders alone (no torch), so the
HTTP layer validates requests against exactly what the Denoiser will load."""

from __future__ import annotations

import logging
from pathlib import Path

from undiffuse.config import CONFIG_FILE, PIPELINE_FILE, CheckpointError, ModelSpec, check_weights, read_model_folder

log = logging.getLogger("ray.serve")


class ModelRegistry:
    """Every sub-folder of model_dir with a config.json (a model or a diffusers network) or a
    model_index.json (a diffusers pipeline) is a model named after the folder.

    A folder that cannot be served as it says (unreadable, or a model undiffuse would sample
    wrongly) is skipped, logged with the reason and listed in `skipped`, so one bad folder does
    not stop the others; the default model must be servable."""

    def __init__(self, model_dir: Path, default: str) -> None:
        self.model_dir = Path(model_dir)
        self.default = default
        self.models: dict[str, ModelSpec] = {}
        self.skipped: dict[str, str] = {}
        folders = {f.parent for pattern in (CONFIG_FILE, PIPELINE_FILE) for f in self.model_dir.glob(f"*/{pattern}")}
        for folder in sorted(folders):
            try:
                spec = read_model_folder(folder)
                check_weights(spec)
                self.models[folder.name] = spec
            except CheckpointError as e:
                self.skipped[folder.name] = str(e)
                log.warning("model %s skipped: %s", folder.name, e)
        if default not in self.models:
            reason = self.skipped.get(default, "no such folder")
            raise ValueError(f"default model {default!r} in {self.model_dir} cannot be served: {reason}")

    def get(self, name: str | None) -> ModelSpec | None:
        return self.models.get(name or self.default)
