"""CUDA checks: run on a GPU machine, skipped cleanly elsewhere (see tests/conftest.py)."""

from pathlib import Path

import pytest
import torch

from undiffuse import DDIMSampler, DDPMSampler, ImageNoise, load_model

pytestmark = pytest.mark.gpu
MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist"


def test_noise_is_the_same_on_cpu_and_cuda():
    cpu = ImageNoise([5, 5], [0, 7]).draw(3, (1, 28, 28))
    gpu = ImageNoise([5, 5], [0, 7], device="cuda").draw(3, (1, 28, 28))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-5)


@pytest.mark.parametrize("make", [lambda s: DDIMSampler(s), lambda s: DDPMSampler(s)])
def test_demo_model_samples_match_across_devices(make):
    labels = torch.arange(8) % 10
    out = {}
    for device in ("cpu", "cuda"):
        model = load_model(MODEL, device)
        out[device] = (
            make(model.schedule)
            .sample(
                model.eps,
                model.image_shape,
                steps=20,
                noise=ImageNoise.for_request(0, 8, device),
                class_labels=labels,
                device=device,
            )
            .cpu()
        )
    assert (out["cpu"] - out["cuda"]).abs().max() < 2e-2  # float round-off of the network (TF32/cuDNN)


def test_training_step_with_mixed_precision(tmp_path):
    from undiffuse import ModelConfig, ScheduleConfig, UNetConfig
    from undiffuse.training import TrainConfig, Trainer

    cfg = ModelConfig(
        unet=UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=2),
        schedule=ScheduleConfig(num_timesteps=100),
    )
    trainer = Trainer(
        tmp_path, cfg, TrainConfig(steps=3, batch_size=4, checkpoint_every=3, sample_steps=2), device="cuda"
    )
    assert trainer.amp_dtype in (torch.bfloat16, torch.float16)
    trainer.fit(torch.rand(8, 1, 8, 8) * 2 - 1, torch.tensor([0, 1] * 4), progress=False)
    assert (tmp_path / "model" / "model.safetensors").is_file()
