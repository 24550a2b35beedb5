"""undiffuse.config: the one reader of model folders, used by the core and the HTTP layer."""

import json
import subprocess
import sys

import pytest

from undiffuse.config import CheckpointError, ModelConfig, ScheduleConfig, UNetConfig, read_model_folder

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=3)


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_reads_an_undiffuse_folder(tmp_path):
    cfg = ModelConfig(TINY, ScheduleConfig("cosine", 500), prediction_type="v", class_names=("a", "b", "c"))
    _write(tmp_path / "m" / "config.json", cfg.to_dict())
    spec = read_model_folder(tmp_path / "m")
    assert (spec.name, spec.format, spec.image_shape, spec.num_classes) == ("m", "undiffuse", (1, 8, 8), 3)
    assert spec.schedule == ScheduleConfig("cosine", 500)
    assert spec.prediction_type == "v" and spec.class_names == ("a", "b", "c")
    assert spec.model_config() == cfg


def test_the_guidance_interval_is_saved_read_and_checked(tmp_path):
    cfg = ModelConfig(TINY, ScheduleConfig(), class_names=("a", "b", "c"), guidance_interval=(0.28, 5.42))
    _write(tmp_path / "m" / "config.json", cfg.to_dict())
    spec = read_model_folder(tmp_path / "m")
    assert spec.guidance_interval == (0.28, 5.42) and spec.model_config() == cfg
    older = {k: v for k, v in cfg.to_dict().items() if k != "guidance_interval"}  # written before the field
    _write(tmp_path / "old" / "config.json", older)
    assert read_model_folder(tmp_path / "old").guidance_interval is None
    for bad in ([5.0, 1.0], [1.0], [], [0.1, 1.0, 99], {"low": 1}, ["a", "b"], [0.1, 1e400]):
        _write(tmp_path / "bad" / "config.json", {**cfg.to_dict(), "guidance_interval": bad})
        with pytest.raises(CheckpointError, match="guidance_interval must be"):
            read_model_folder(tmp_path / "bad")


def _diffusers_unet(folder, **extra):
    _write(folder / "config.json", {"_class_name": "UNet2DModel", "sample_size": 32, "in_channels": 3, **extra})


def test_diffusers_folder_reads_its_own_scheduler_config(tmp_path):
    _diffusers_unet(tmp_path / "d", num_class_embeds=10)
    _write(
        tmp_path / "d" / "scheduler_config.json",
        {"num_train_timesteps": 400, "beta_schedule": "linear", "beta_end": 0.03, "prediction_type": "v_prediction"},
    )
    spec = read_model_folder(tmp_path / "d")
    assert (spec.format, spec.image_shape, spec.num_classes) == ("diffusers", (3, 32, 32), 10)
    assert spec.schedule == ScheduleConfig("linear", 400, 1e-4, 0.03)
    assert spec.prediction_type == "v"  # read from the file, not assumed
    with pytest.raises(CheckpointError, match="no undiffuse ModelConfig"):
        spec.model_config()


def test_diffusers_pipeline_folder_falls_back_to_the_sibling_scheduler(tmp_path):
    _diffusers_unet(tmp_path / "pipe" / "unet")
    _write(
        tmp_path / "pipe" / "scheduler" / "scheduler_config.json",
        {"num_train_timesteps": 250, "beta_schedule": "squaredcos_cap_v2"},
    )
    spec = read_model_folder(tmp_path / "pipe" / "unet")
    assert spec.schedule == ScheduleConfig("cosine", 250) and spec.prediction_type == "epsilon"


def test_diffusers_folder_without_scheduler_gets_the_ddpm_default(tmp_path):
    _diffusers_unet(tmp_path / "d")
    assert read_model_folder(tmp_path / "d").schedule == ScheduleConfig("linear", 1000, 1e-4, 0.02)


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        ({"beta_schedule": "scaled_linear"}, "unsupported beta_schedule 'scaled_linear'"),
        ({"prediction_type": "sample"}, "unsupported prediction_type 'sample'"),
        ({"num_train_timesteps": "many"}, "invalid scheduler config"),
    ],
)
def test_bad_diffusers_scheduler_configs_name_the_file(tmp_path, scheduler, message):
    _diffusers_unet(tmp_path / "d")
    _write(tmp_path / "d" / "scheduler_config.json", scheduler)
    with pytest.raises(CheckpointError, match=message) as err:
        read_model_folder(tmp_path / "d")
    assert "scheduler_config.json" in str(err.value)


def test_bad_folders_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="model folder not found"):
        read_model_folder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        read_model_folder(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_model_folder(tmp_path / "bad")
    _write(tmp_path / "old" / "config.json", {"format": "undiffuse", "version": 99})
    with pytest.raises(CheckpointError, match="invalid config"):
        read_model_folder(tmp_path / "old")


def test_schedule_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown schedule kind"):
        ScheduleConfig(kind="quadratic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_timesteps"):
        ScheduleConfig(num_timesteps=0)


def test_config_and_registry_import_no_torch():
    """The HTTP layer reads these; importing them must not pull torch in."""
    code = "import sys, undiffuse.config, undiffuse.registry; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
