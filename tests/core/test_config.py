"""undiffuse.config: the one reader of model folders, used by the core and the HTTP layer."""

import json
import subprocess
import sys

import pytest

from undiffuse.config import (
    CheckpointError,
    ModelConfig,
    ScheduleConfig,
    Thresholding,
    UNetConfig,
    read_model_folder,
)

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
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # read_model_folder checks it is there


def _scheduler(path, **cfg):
    _write(path, {"_class_name": "DDPMScheduler", **cfg})


def test_diffusers_folder_reads_its_own_scheduler_config(tmp_path):
    _diffusers_unet(tmp_path / "d", num_class_embeds=10)
    _scheduler(
        tmp_path / "d" / "scheduler_config.json",
        num_train_timesteps=400,
        beta_schedule="linear",
        beta_end=0.03,
        prediction_type="v_prediction",
        clip_sample=False,
    )
    spec = read_model_folder(tmp_path / "d")
    assert (spec.format, spec.image_shape, spec.num_classes) == ("diffusers", (3, 32, 32), 10)
    assert spec.schedule == ScheduleConfig("linear", 400, 1e-4, 0.03)
    assert spec.prediction_type == "v"  # read from the file, not assumed
    assert spec.clip_sample is False
    with pytest.raises(CheckpointError, match="no undiffuse ModelConfig"):
        spec.model_config()


def test_diffusers_pipeline_folder_falls_back_to_the_sibling_scheduler(tmp_path):
    _diffusers_unet(tmp_path / "pipe" / "unet")
    _scheduler(
        tmp_path / "pipe" / "scheduler" / "scheduler_config.json",
        num_train_timesteps=250,
        beta_schedule="squaredcos_cap_v2",
    )
    spec = read_model_folder(tmp_path / "pipe" / "unet")
    assert spec.schedule == ScheduleConfig("cosine", 250) and spec.prediction_type == "epsilon"
    assert spec.clip_sample is True  # DDPMScheduler's default


def test_a_network_without_a_schedule_is_refused_rather_than_guessed(tmp_path):
    _diffusers_unet(tmp_path / "unet")
    with pytest.raises(CheckpointError, match="noise schedule it was trained with is unknown"):
        read_model_folder(tmp_path / "unet")


@pytest.mark.parametrize(
    ("scheduler", "message"),
    [
        (
            {"_class_name": "CMStochasticIterativeScheduler"},
            "_class_name 'CMStochasticIterativeScheduler' is not a scheduler",
        ),
        ({"_class_name": "EulerDiscreteScheduler"}, "_class_name 'EulerDiscreteScheduler' is not a scheduler"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule 'sigmoid' is not supported"),
        ({"prediction_type": "flow"}, "prediction_type 'flow' is not supported"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas .* is not supported"),
        ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr True is not supported"),
        ({"thresholding": "on"}, "thresholding 'on' must be true or false"),
        ({"thresholding": True, "sample_max_value": 0.5}, "invalid dynamic thresholding .*sample_max_value"),
        ({"thresholding": True, "dynamic_thresholding_ratio": 1.5}, "invalid dynamic thresholding .*ratio"),
        ({"variance_type": "learned_range"}, "variance_type 'learned_range' is not supported"),
        ({"clip_sample_range": 2.0}, "clip_sample_range 2.0 is not supported"),
        ({"clip_sample": "yes"}, "clip_sample 'yes' must be true or false"),
        ({"num_train_timesteps": "many"}, "invalid scheduler config"),
    ],
)
def test_schedulers_undiffuse_does_not_reproduce_are_refused_naming_file_and_field(tmp_path, scheduler, message):
    _diffusers_unet(tmp_path / "d")
    _write(tmp_path / "d" / "scheduler_config.json", {"_class_name": "DDPMScheduler", **scheduler})
    with pytest.raises(CheckpointError, match=message) as err:
        read_model_folder(tmp_path / "d")
    assert "scheduler_config.json" in str(err.value)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_the_supported_scheduler_classes_and_schedules_are_read(tmp_path, cls):
    _diffusers_unet(tmp_path / "d")
    _write(
        tmp_path / "d" / "scheduler_config.json",
        {
            "_class_name": cls,
            "beta_schedule": "scaled_linear",
            "beta_start": 0.0015,
            "beta_end": 0.0195,
            "prediction_type": "sample",
        },
    )
    spec = read_model_folder(tmp_path / "d")
    assert spec.schedule == ScheduleConfig("scaled_linear", 1000, 0.0015, 0.0195)
    assert spec.prediction_type == "sample"
    assert spec.clip_sample is (None if cls == "DPMSolverMultistepScheduler" else True)


@pytest.mark.parametrize("cls", ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_dynamic_thresholding_is_read_as_configured(tmp_path, cls):
    """thresholding: true with its ratio and maximum (clip_sample_range does not matter then:
    thresholding replaces clipping, as in diffusers)."""
    _diffusers_unet(tmp_path / "d")
    settings = {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5}
    _write(tmp_path / "d" / "scheduler_config.json", {"_class_name": cls, **settings, "clip_sample_range": 2.0})
    assert read_model_folder(tmp_path / "d").thresholding == Thresholding(0.9, 1.5)
    _write(tmp_path / "d" / "scheduler_config.json", {"_class_name": cls, "thresholding": True})
    assert read_model_folder(tmp_path / "d").thresholding == Thresholding(0.995, 1.0)  # diffusers' defaults
    _write(tmp_path / "d" / "scheduler_config.json", {"_class_name": cls})
    assert read_model_folder(tmp_path / "d").thresholding is None


def test_a_pickled_network_is_refused(tmp_path):
    _diffusers_unet(tmp_path / "d")
    _scheduler(tmp_path / "d" / "scheduler_config.json")
    (tmp_path / "d" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "d" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(CheckpointError, match="is a pickle, which undiffuse does not load"):
        read_model_folder(tmp_path / "d")


def test_learned_variance_networks_are_refused(tmp_path):
    _diffusers_unet(tmp_path / "d", out_channels=6)
    _scheduler(tmp_path / "d" / "scheduler_config.json")
    with pytest.raises(CheckpointError, match="out_channels 6 != in_channels 3"):
        read_model_folder(tmp_path / "d")


def test_a_pixel_pipeline_folder_is_one_model_and_unknown_latent_ones_are_refused(tmp_path):
    pipe = tmp_path / "cifar"
    _write(
        pipe / "model_index.json",
        {
            "_class_name": "DDPMPipeline",
            "unet": ["diffusers", "UNet2DModel"],
            "scheduler": ["diffusers", "DDPMScheduler"],
        },
    )
    _diffusers_unet(pipe / "unet")
    _scheduler(pipe / "scheduler" / "scheduler_config.json", num_train_timesteps=300)
    spec = read_model_folder(pipe)
    assert (spec.name, spec.format, spec.path, spec.network_path) == ("cifar", "diffusers", pipe, pipe / "unet")
    assert spec.schedule.num_timesteps == 300

    # LDMPipeline and DiTPipeline are served (tests/core/test_latent_models.py); a latent pipeline
    # with other parts, such as text-conditioned Stable Diffusion, is not
    _write(
        pipe / "model_index.json", {"_class_name": "StableDiffusionPipeline", "unet": [], "vae": [], "scheduler": []}
    )
    with pytest.raises(
        CheckpointError, match="a latent pipeline .*'StableDiffusionPipeline' with vae.* LDMPipeline, DiT"
    ):
        read_model_folder(pipe)
    _write(pipe / "model_index.json", {"_class_name": "LDMPipeline", "unet": [], "vqvae": [], "scheduler": []})
    with pytest.raises(CheckpointError, match="model_index.json: the pipeline has no vqvae/ folder"):
        read_model_folder(pipe)
    _write(pipe / "model_index.json", {"_class_name": "StableDiffusionPipeline", "unet": [], "scheduler": []})
    with pytest.raises(CheckpointError, match="_class_name 'StableDiffusionPipeline' is not a pipeline"):
        read_model_folder(pipe)
    _write(pipe / "model_index.json", {"_class_name": "DDPMPipeline", "unet": []})
    with pytest.raises(CheckpointError, match="the pipeline has no scheduler/ folder"):
        read_model_folder(pipe)


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
