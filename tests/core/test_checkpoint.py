import json

import pytest
import torch

from undiffuse import CheckpointError, ModelConfig, ScheduleConfig, UNet, UNetConfig, load_model, save_model
from undiffuse.invariance import in_slices

TINY = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(4,), num_classes=3)


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    net = UNet(TINY)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(kind="cosine", num_timesteps=500), prediction_type="v")
    folder = save_model(tmp_path / "m", net.state_dict(), cfg)
    return net.eval(), folder


def test_save_then_load_gives_identical_outputs(saved):
    net, folder = saved
    model = load_model(folder, channels_last=False)
    assert model.schedule.num_timesteps == 500 and model.schedule.config.kind == "cosine"
    assert (model.image_size, model.channels, model.num_classes, model.prediction_type) == (8, 1, 3, "v")
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 400]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.equal(model.network(x, t, y), net(x, t, y))
        # v-prediction is converted to eps for the samplers (the network run in the model's
        # batch-invariant slices: undiffuse.invariance)
        v = in_slices(net, x, t, y, model.rows_for(x.device))
        assert torch.allclose(model.eps(x, t, y), model.schedule.eps_from_velocity(x, t, v))


def test_channels_last_layout_matches_to_round_off(saved):
    net, folder = saved
    model = load_model(folder)  # channels_last by default, for speed
    assert model.network.stem.weight.is_contiguous(memory_format=torch.channels_last)
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([3, 400]), torch.tensor([0, 2])
    with torch.no_grad():
        assert torch.allclose(model.network(x, t, y), net(x, t, y), atol=1e-5)


def test_truncated_weights_name_the_file(saved):
    _, folder = saved
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unreadable or truncated"):
        load_model(folder)


def test_missing_files_are_named(saved, tmp_path):
    _, folder = saved
    with pytest.raises(CheckpointError, match="model folder not found"):
        load_model(tmp_path / "nowhere")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing"):
        load_model(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        load_model(folder)


def test_mismatched_config_is_explained(saved):
    _, folder = saved
    cfg = json.loads((folder / "config.json").read_text())
    cfg["unet"]["base_channels"] = 32
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weights do not match config.json: .*shape mismatches"):
        load_model(folder)


def test_malformed_config_is_explained(saved):
    _, folder = saved
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(folder)
    (folder / "config.json").write_text(json.dumps({"format": "undiffuse", "version": 1, "unet": {"wings": 2}}))
    with pytest.raises(CheckpointError, match="invalid config"):
        load_model(folder)


def test_loads_a_diffusers_unet2dmodel_folder(tmp_path):
    import diffusers

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=16,
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    unet.save_pretrained(tmp_path / "ddpm")
    diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(tmp_path / "ddpm")
    model = load_model(tmp_path / "ddpm")
    assert (model.image_size, model.channels, model.num_classes) == (16, 3, None)
    assert model.schedule.num_timesteps == 1000
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():
        assert torch.allclose(model.eps(x, t), unet(x, t).sample, atol=1e-5)
