import numpy as np
import pytest
import torch
from PIL import Image

from undiffuse import UNet, UNetConfig
from undiffuse.data import DatasetError, load_image_folder


@pytest.mark.parametrize(
    "cfg",
    [
        UNetConfig(image_size=28, in_channels=1, base_channels=16, channel_mult=(1, 2, 2), attention_resolutions=(7,)),
        UNetConfig(
            image_size=32,
            in_channels=3,
            base_channels=16,
            channel_mult=(1, 2, 2, 2),
            attention_resolutions=(16, 8),
            num_classes=5,
        ),
        UNetConfig(
            image_size=12,
            in_channels=3,
            base_channels=8,
            channel_mult=(1, 2),
            num_res_blocks=2,
            attention_resolutions=(),
            norm_groups=4,
        ),
    ],
)
def test_output_shape_matches_input(cfg):
    net = UNet(cfg)
    x = torch.randn(3, cfg.in_channels, cfg.image_size, cfg.image_size)
    labels = torch.tensor([0, 1, -1]) if cfg.num_classes else None
    out = net(x, torch.tensor([0, 10, 999]), labels)
    assert out.shape == x.shape


def test_config_errors_are_explicit():
    with pytest.raises(ValueError, match="divisible by the down-sampling factor 4"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="in_channels must be 1 or 3"):
        UNetConfig(in_channels=2)
    with pytest.raises(ValueError, match="unconditional"):
        UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=()))(
            torch.zeros(1, 1, 28, 28), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        )


def test_null_class_is_unconditional():
    net = UNet(UNetConfig(base_channels=8, channel_mult=(1, 2), attention_resolutions=(), num_classes=3)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x, t = torch.randn(2, 1, 28, 28), torch.tensor([5, 5])
        assert torch.equal(net(x, t, None), net(x, t, torch.tensor([-1, -1])))
        assert not torch.allclose(net(x, t, torch.tensor([0, 0])), net(x, t, torch.tensor([2, 2])))


def test_image_folder_with_class_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    x, y = load_image_folder(tmp_path, image_size=16, channels=3)
    assert x.shape == (6, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert y.tolist() == [0, 0, 0, 1, 1, 1]
    grey, _ = load_image_folder(tmp_path, image_size=8, channels=1)
    assert grey.shape == (6, 1, 8, 8)


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path, 16, 3)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="broken.png: cannot decode"):
        load_image_folder(tmp_path, 16, 3)
