import pytest
import torch

from undiffuse import ModelConfig, NoiseSchedule, ScheduleConfig, UNetConfig, load_model
from undiffuse.training import TrainConfig, Trainer, diffusion_loss, lr_factor

pytestmark = pytest.mark.slow  # seconds per test on 2 cores: not in the fast tier

TINY = UNetConfig(
    image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(), num_classes=2, dropout=0.0
)


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (n,), generator=g)
    # class 0: a bright left half, class 1: a bright right half
    x = -torch.ones(n, 1, 8, 8)
    x[labels == 0, :, :, :4] = 1
    x[labels == 1, :, :, 4:] = 1
    return x, labels


def test_loss_decreases_and_checkpoint_is_served_model(tmp_path):
    images, labels = _data()
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=100))
    trainer = Trainer(
        tmp_path,
        cfg,
        TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10, checkpoint_every=60, sample_steps=5),
    )
    torch.manual_seed(0)
    before = sum(diffusion_loss(trainer.network, trainer.schedule, images, labels).item() for _ in range(5))
    trainer.fit(images, labels, progress=False)
    torch.manual_seed(0)
    after = sum(diffusion_loss(trainer.network, trainer.schedule, images, labels).item() for _ in range(5))
    assert after < 0.7 * before
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_000060.png", "step_000120.png"]
    served = load_model(tmp_path / "model")
    ema = trainer.ema.module.state_dict()
    for k, v in served.network.state_dict().items():
        assert torch.equal(v, ema[k]), k


def test_bf16_autocast_trains_on_the_cpu_and_keeps_fp32_weights(tmp_path):
    images, labels = _data()
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=100))
    tc = TrainConfig(steps=120, batch_size=32, lr=2e-3, warmup_steps=10, checkpoint_every=120, sample_steps=2)
    trainer = Trainer(tmp_path, cfg, TrainConfig(**{**tc.__dict__, "mixed_precision": "bf16"}))
    assert trainer.amp_dtype is torch.bfloat16
    assert Trainer(tmp_path / "fp32", cfg, tc).amp_dtype is None  # auto is fp32 on the CPU
    seen = []
    hook = trainer.network.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    torch.manual_seed(0)
    before = sum(diffusion_loss(trainer.network, trainer.schedule, images, labels).item() for _ in range(5))
    trainer.fit(images, labels, progress=False)
    hook.remove()
    torch.manual_seed(0)
    after = sum(diffusion_loss(trainer.network, trainer.schedule, images, labels).item() for _ in range(5))
    assert set(seen[5:]) == {torch.bfloat16}  # the training steps ran under autocast
    assert after < 0.7 * before
    assert all(p.dtype == torch.float32 for p in load_model(tmp_path / "model").network.parameters())
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")  # type: ignore[arg-type]


def test_resume_continues_from_the_saved_step(tmp_path):
    images, labels = _data()
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=100), prediction_type="v")
    tc = TrainConfig(steps=4, batch_size=8, checkpoint_every=2, sample_steps=2)
    first = Trainer(tmp_path, cfg, tc)
    first.fit(images, labels, progress=False)
    again = Trainer(tmp_path, cfg, TrainConfig(steps=6, batch_size=8, checkpoint_every=2, sample_steps=2))
    assert again.resume() and again.step == 4
    for k, v in first.network.state_dict().items():
        assert torch.equal(v, again.network.state_dict()[k])
    assert again.optimizer.state_dict()["state"]  # Adam moments came back too
    again.fit(images, labels, progress=False)
    assert again.step == 6


def test_v_prediction_target():
    cfg_eps = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=10))
    schedule = NoiseSchedule.from_config(cfg_eps.schedule)
    x0 = torch.zeros(4, 1, 8, 8)
    # a network that returns zeros: eps loss is E[eps^2] = 1, v loss is E[a_bar eps^2] < 1
    zero = lambda x, t, y: torch.zeros_like(x)  # noqa: E731
    torch.manual_seed(0)
    l_eps = diffusion_loss(zero, schedule, x0, None, "epsilon")
    torch.manual_seed(0)
    l_v = diffusion_loss(zero, schedule, x0, None, "v")
    assert 0.8 < l_eps.item() < 1.2 and l_v.item() < l_eps.item()


def test_cosine_lr_warms_up_then_decays_to_zero_at_the_last_step():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup_steps=100, lr_decay="cosine")
    factors = [lr_factor(s, cfg) for s in range(1001)]
    assert factors[0] == 0.01 and factors[99] == 1.0
    assert factors[100] == 1.0 and abs(factors[550] - 0.5) < 1e-9 and factors[1000] == 0.0
    assert all(a >= b for a, b in zip(factors[100:], factors[101:], strict=False))
    assert lr_factor(500, TrainConfig(steps=1000, warmup_steps=100)) == 1.0  # constant by default
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="linear")  # type: ignore[arg-type]


def test_resume_with_a_new_lr_and_decay_follows_the_new_curve(tmp_path):
    images, labels = _data()
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=100))
    Trainer(tmp_path, cfg, TrainConfig(steps=4, lr=8e-4, warmup_steps=2, checkpoint_every=4, sample_steps=2)).fit(
        images, labels, progress=False
    )
    tc = TrainConfig(steps=12, lr=4e-4, warmup_steps=2, lr_decay="cosine", checkpoint_every=4, sample_steps=2)
    again = Trainer(tmp_path, cfg, tc)
    assert again.resume() and again.step == 4
    assert again.optimizer.param_groups[0]["lr"] == 4e-4 * lr_factor(4, tc)
    again.fit(images, labels, progress=False)
    assert again.optimizer.param_groups[0]["lr"] == 0.0  # the cosine's end, from the new base lr


def test_a_wall_time_limit_stops_part_way_and_saves_a_resumable_state(tmp_path):
    images, labels = _data()
    cfg = ModelConfig(unet=TINY, schedule=ScheduleConfig(num_timesteps=100))
    tc = TrainConfig(
        steps=10**6, batch_size=8, warmup_steps=2, lr_decay="cosine", checkpoint_every=10**6, sample_steps=2
    )
    trainer = Trainer(tmp_path, cfg, tc)
    trainer.fit(images, labels, progress=False, max_seconds=0.5)
    assert 0 < trainer.step < tc.steps
    again = Trainer(tmp_path, cfg, tc)
    assert again.resume() and again.step == trainer.step  # saved where it stopped
    assert [p.name for p in (tmp_path / "samples").iterdir()] == [f"step_{trainer.step:06d}.png"]  # saved once
    assert again.optimizer.param_groups[0]["lr"] > 0  # the cosine to 10**6 was not finished
