"""Latent models as diffusers saves them: an LDMPipeline (UNet2DModel on VQModel latents) and a
DiTPipeline (class-conditional DiTTransformer2DModel with learned variances, AutoencoderKL),
tiny random-weight pipelines of the real architectures made here (nothing is downloaded).
undiffuse samples them step for step as diffusers does on the same weights and the same x_T,
decodes them to the same images, and the engine and the CLI hand back those images."""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path

import diffusers  # a test dependency (requirements.lock)
import numpy as np
import pytest
import torch
from PIL import Image

from undiffuse import ImageNoise, load_model
from undiffuse.cli import main
from undiffuse.config import CheckpointError, check_weights, read_model_folder
from undiffuse.engine import DenoisingEngine, EngineConfig, Request
from undiffuse.images import to_uint8
from undiffuse.registry import make_sampler
from undiffuse.samplers import guided_eps, previous_timesteps

STEPS = 10
ATOL = 1e-5
NUM_CLASSES = 1000  # DiTPipeline's null class is the id 1000, so the tiny DiT has ImageNet's classes
DEMO_MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist"  # a pixel model


def _unit_output(layer: torch.nn.Module, net, *args, **kwargs) -> None:
    """Scale the network's last layer so that it predicts noise of about unit variance, as a
    trained one does (random weights predict several times more)."""
    with torch.no_grad():
        std = net(*args, **kwargs).sample.std()
        layer.weight /= std
        layer.bias /= std


def _ldm(folder) -> diffusers.LDMPipeline:
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    ).eval()
    vqvae = diffusers.VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        latent_channels=3,
        num_vq_embeddings=64,
        norm_num_groups=8,
        sample_size=16,
        scaling_factor=0.5,  # not 1, so that LDMPipeline's division by it is checked
    )
    _unit_output(unet.conv_out, unet, torch.randn(2, 3, 8, 8), torch.tensor([10, 900]))
    # CompVis/ldm-celebahq-256's scheduler: DDIM on a scaled_linear schedule, no clipping
    scheduler = diffusers.DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False
    )
    pipe = diffusers.LDMPipeline(vqvae=vqvae.eval(), unet=unet.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def _dit(folder, learned_sigma: bool = True) -> diffusers.DiTPipeline:
    torch.manual_seed(0)
    transformer = diffusers.DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8 if learned_sigma else 4,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NUM_CLASSES,
    ).eval()
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
        scaling_factor=0.18215,
    )
    _unit_output(
        transformer.proj_out_2, transformer, torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.tensor([1, 2])
    )
    # eval(): in training mode DiT drops a tenth of the labels at random (its null-class training)
    pipe = diffusers.DiTPipeline(transformer.eval(), vae.eval(), diffusers.DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    # facebook/DiT-XL-2-256 carries its class names in model_index.json (save_pretrained does not write them)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {str(i): f"class {i}" for i in range(NUM_CLASSES)}
    (folder / "model_index.json").write_text(json.dumps(index))
    return pipe


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ldm") / "ldm"
    return folder, _ldm(folder)


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "dit"
    return folder, _dit(folder)


def _x_T(shape, seed=0):
    """The x_T diffusers' pipelines draw on a CPU for torch.Generator().manual_seed(seed)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sampler(model):
    return make_sampler("ddim", model.schedule, clip_sample=model.clip_sample)


def _ours(model, x_T, labels=None, guidance=1.0):
    """undiffuse's own sampling (DDIM, STEPS steps) from x_T, decoded: images [N, C, H, W]."""
    x = _sampler(model).sample(
        model.eps,
        model.sample_shape,
        steps=STEPS,
        noise=ImageNoise.for_request(0, x_T.shape[0]),
        x_T=x_T,
        class_labels=labels,
        guidance_scale=guidance,
    )
    with torch.no_grad():
        return model.decode(x)


def _step(model, x, t, t_prev, labels=None, guidance=1.0):
    """One of undiffuse's DDIM steps from x, on the model's own (guided) noise prediction."""
    rows = torch.full((x.shape[0],), int(t))
    with torch.no_grad():
        eps = guided_eps(model.eps, x, rows, labels, guidance)
    return _sampler(model).step(eps, rows, x, None, t_prev=t_prev).prev_sample


def _close(ours, theirs, what):
    """Equal to ATOL where |x| <= 1, to ATOL relative above: a random network's predictions do
    not track the noise in x as a trained one's do, so DDIM without clipping carries its latents
    to |x| ~ 50, where the float32 round-off of either implementation is 1e-5 alone."""
    error = ((ours - theirs).abs() / theirs.abs().clamp(min=1)).max()
    assert error <= ATOL, (what, float(error))
    return float((ours - theirs).abs().max())


def _to_unit(images):
    return (images / 2 + 0.5).clamp(0, 1)


def test_a_latent_folder_describes_the_image_and_the_latents(ldm, dit):
    spec = read_model_folder(ldm[0])
    assert (spec.image_size, spec.channels, spec.num_classes, spec.sample_shape) == (16, 3, None, (3, 8, 8))
    assert (spec.latent.denoiser, spec.latent.decoder, spec.latent.scaling_factor) == ("UNet2DModel", "VQModel", 0.5)
    assert spec.schedule.kind == "scaled_linear" and spec.clip_sample is False
    check_weights(spec)

    spec = read_model_folder(dit[0])
    assert (spec.image_size, spec.channels, spec.num_classes, spec.sample_shape) == (32, 3, 1000, (4, 8, 8))
    assert spec.latent.learned_sigma and spec.latent.decoder == "AutoencoderKL"
    assert spec.class_names[:2] == ("class 0", "class 1") and len(spec.class_names) == 1000
    assert spec.network_path == dit[0] / "transformer" and spec.latent.decoder_path == dit[0] / "vae"


def test_the_ldm_pipeline_is_sampled_and_decoded_as_diffusers_does(ldm):
    folder, pipe = ldm
    model = load_model(folder, channels_last=False)  # diffusers' layout: the same convolution kernels
    assert model.is_latent and model.sample_shape == (3, 8, 8) and model.image_shape == (3, 16, 16)
    x_T = _x_T((2, 3, 8, 8))
    images = _ours(model, x_T)

    # diffusers' own loop (LDMPipeline.__call__), each of our steps from the same x as diffusers'
    scheduler = pipe.scheduler
    scheduler.set_timesteps(STEPS)
    assert scheduler.timesteps.tolist() == _sampler(model).timesteps(STEPS)
    x = x_T * scheduler.init_noise_sigma
    with torch.no_grad():
        for t, t_prev in zip(scheduler.timesteps, previous_timesteps(scheduler.timesteps.tolist()), strict=True):
            ours = _step(model, x, t, t_prev)
            x = scheduler.step(pipe.unet(scheduler.scale_model_input(x, t), t).sample, t, x).prev_sample
            _close(ours, x, f"step at t={int(t)}")
        theirs = pipe.vqvae.decode(x / pipe.vqvae.config.scaling_factor).sample
    _close(images, theirs, "decoded")
    assert images.std() > 0.05  # random weights that make an image, not a constant

    # and the pipeline itself, from the same x_T (its generator draws it)
    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=STEPS, output_type="np")
    _close(_to_unit(images).permute(0, 2, 3, 1), torch.from_numpy(out.images), "LDMPipeline's images")


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_dit_pipeline_is_sampled_and_decoded_as_diffusers_does(dit, guidance):
    """Class-conditional, learned-variance channels dropped, guidance through DiT's null class."""
    folder, pipe = dit
    model = load_model(folder, channels_last=False)
    assert model.sample_shape == (4, 8, 8) and model.image_shape == (3, 32, 32)
    classes = [3, 997]
    x_T = _x_T((2, 4, 8, 8))
    images = _ours(model, x_T, torch.tensor(classes), guidance)

    scheduler, net = pipe.scheduler, pipe.transformer
    scheduler.set_timesteps(STEPS)
    x = x_T
    labels = torch.tensor(classes + [NUM_CLASSES] * 2)
    with torch.no_grad():
        for t, t_prev in zip(scheduler.timesteps, previous_timesteps(scheduler.timesteps.tolist()), strict=True):
            ours = _step(model, x, t, t_prev, torch.tensor(classes), guidance)
            if guidance > 1:
                out = net(torch.cat([x, x]), timestep=t.expand(4), class_labels=labels).sample[:, :4]
                cond, uncond = out.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            else:
                eps = net(x, timestep=t.expand(2), class_labels=labels[:2]).sample[:, :4]
            x = scheduler.step(eps, t, x).prev_sample
            _close(ours, x, f"step at t={int(t)}")
        theirs = pipe.vae.decode(x / pipe.vae.config.scaling_factor).sample
    _close(images, theirs, "decoded")
    assert images.std() > 0.01

    out = pipe(
        classes,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(0),
        num_inference_steps=STEPS,
        output_type="pt",
    )
    _close(_to_unit(images), out.images, "DiTPipeline's images")


def test_the_null_class_reaches_dit_as_its_own_id(dit):
    """NULL_CLASS (-1) is DiT's unconditional embedding row, id num_classes."""
    model = load_model(dit[0])
    x, t = _x_T((1, 4, 8, 8)), torch.tensor([500])
    with torch.no_grad():
        ours = model.eps(x, t, torch.tensor([-1]))
        theirs = dit[1].transformer(x, timestep=t, class_labels=torch.tensor([NUM_CLASSES])).sample[:, :4]
        conditional = model.eps(x, t, torch.tensor([0]))
    assert (ours - theirs).abs().max() <= ATOL
    assert (ours - conditional).abs().max() > 1e-3


@pytest.mark.parametrize("which", ["ldm", "dit"])
def test_the_engine_makes_the_images_single_request_sampling_makes(ldm, dit, which):
    """Rows of several requests denoise latents together; finished rows are decoded one image
    per call (batch-invariant, a CPU's default, whatever max_decode_batch says), and each image
    equals the one sampled and decoded alone (a VQ decoder snaps latents to codes, so a latent
    1e-6 away can decode to another image: both sides run batch-invariant slices, which make
    them equal)."""
    folder = ldm[0] if which == "ldm" else dit[0]
    model = load_model(folder)
    engine = DenoisingEngine(model, EngineConfig(max_batch=16, max_decode_batch=3, keep_samples=True))
    decoded = []  # rows per decoder call
    model.decoder.register_forward_hook(lambda module, args, out: decoded.append(args[0].shape[0]))
    requests = [
        Request(id="a", owner="x", seed=1, start=0, count=4, steps=STEPS),
        Request(id="b", owner="y", seed=2, start=4, count=3, steps=STEPS + 2, preview_every=2),
    ]
    if which == "dit":
        requests = [
            Request(**{**r.__dict__, "labels": [7 * i for i in range(r.count)], "guidance_scale": 1.0 + i})
            for i, r in enumerate(requests)
        ]
    for r in requests:
        engine.add(r)
    done = {}
    while not engine.idle:
        for f in engine.step():
            done[f.id] = f
    # b's previews at steps 5 and 10, a's 4 rows at step 10, b's 3 at step 12: one image per call
    assert decoded == [1] * 9
    for r in requests:
        labels = None if r.labels is None else torch.tensor(r.labels)
        sampler = make_sampler("ddim", model.schedule, clip_sample=model.clip_sample)
        noise = ImageNoise([r.seed] * r.count, list(range(r.start, r.start + r.count)))
        with torch.no_grad():
            x = sampler.sample(
                model.eps,
                model.sample_shape,
                steps=r.steps,
                noise=noise,
                class_labels=labels,
                guidance_scale=r.guidance_scale,
            )
            alone = model.decode(x)
        got = done[r.id].samples
        assert got.shape == (r.count, *model.image_shape)
        assert (got - alone).abs().max() <= ATOL, (r.id, (got - alone).abs().max())
        pixels = done[r.id].pixels()
        assert pixels.shape == (r.count, model.image_size, model.image_size, 3) and pixels.dtype == np.uint8
    # previews are decoded images, not more often than preview_decode_every (5) steps
    previews = engine.take_previews()
    assert [p.step for p in previews] == [5, 10]  # asked for every 2 of its 12 steps
    assert previews[0].pixels().shape == (model.image_size, model.image_size, 3)


def test_cli_sample_writes_the_decoded_image_as_an_rgb_png(ldm, tmp_path):
    out = tmp_path / "grid.png"
    args = ["sample", "--model-dir", str(ldm[0]), "--num", "1", "--steps", "3", "--seed", "5", "--sampler", "ddim"]
    assert main([*args, "--nrow", "1", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as image:
        assert (image.size, image.mode) == ((16 + 4, 16 + 4), "RGB")  # one image and the grid's 2 px border
        written = np.asarray(image)[2:-2, 2:-2].astype(int)
    model = load_model(ldm[0])
    x = _sampler(model).sample(model.eps, model.sample_shape, steps=3, noise=ImageNoise.for_request(5, 1))
    with torch.no_grad():
        expected = to_uint8(model.decode(x))[0].astype(int)
    assert np.abs(written - expected).max() <= 1


def test_latent_folders_that_would_be_sampled_wrong_are_refused(tmp_path):
    folder = tmp_path / "dit"
    _dit(folder, learned_sigma=False)
    assert read_model_folder(folder).latent.learned_sigma is False

    def edit(part, changes):
        path = folder / part / "config.json"
        cfg = json.loads(path.read_text())
        path.write_text(json.dumps({**cfg, **changes}))
        return cfg

    vae = edit("vae", {"latent_channels": 8})
    with pytest.raises(
        CheckpointError, match=r"vae/config.json: the decoder takes 8-channel latents, the denoiser makes 4"
    ):
        read_model_folder(folder)
    edit("vae", {**vae, "shift_factor": 0.1})
    with pytest.raises(CheckpointError, match=r"vae/config.json: shift_factor 0.1 is not supported"):
        read_model_folder(folder)
    edit("vae", {**vae, "_class_name": "VQModel"})
    with pytest.raises(CheckpointError, match=r"vae/config.json: _class_name 'VQModel' is not AutoencoderKL"):
        read_model_folder(folder)
    edit("vae", vae)
    transformer = edit("transformer", {"out_channels": 6})
    with pytest.raises(CheckpointError, match=r"transformer/config.json: out_channels 6 is neither"):
        read_model_folder(folder)
    edit("transformer", transformer)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "id2label": {"0": "only one"}}))
    with pytest.raises(CheckpointError, match=r"model_index.json: id2label names 1 classes, the denoiser has 1000"):
        read_model_folder(folder)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "vae" / "diffusion_pytorch_model.safetensors").rename(folder / "vae" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: missing \(.*is a pickle"):
        read_model_folder(folder)
    (folder / "vae" / "diffusion_pytorch_model.bin").rename(folder / "vae" / "diffusion_pytorch_model.safetensors")
    spec = read_model_folder(folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"vae/diffusion_pytorch_model.safetensors: truncated"):
        check_weights(spec)


def _decode_runs(engine: DenoisingEngine, requests) -> tuple[dict, list[int]]:
    """Step `requests` through `engine` to the end: ({id: Finished}, rows per decoder call)."""
    rows: list[int] = []
    hook = engine.model.decoder.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        for r in requests:
            engine.add(r)
        done = {}
        while not engine.idle:
            done.update((f.id, f) for f in engine.step())
    finally:
        hook.remove()
    return done, rows


def test_unset_max_decode_batch_decodes_sixteen_rows_per_call_on_a_cpu_in_whole_batches(ldm):
    """(Batch-invariant slices, a CPU's default, decode one image per call: test_invariance.py.)"""
    engine = DenoisingEngine(load_model(ldm[0]), EngineConfig(max_batch=32, invariant_rows=0))
    assert EngineConfig().max_decode_batch is None
    assert (engine.decode_batch, engine.decode_buckets[-1]) == (16, 16)
    _done, rows = _decode_runs(engine, [Request(id="a", owner="x", seed=3, start=0, count=20, steps=3)])
    assert rows == [16, 4]


@pytest.mark.parametrize("which", ["ldm", "dit"])
def test_the_images_do_not_depend_on_the_decode_chunk(ldm, dit, which):
    """Rows of requests that finish at one step and at different steps, decoded one, four or
    sixteen (unset, on a CPU) per call: the same images."""
    model = load_model(ldm[0] if which == "ldm" else dit[0])
    requests = [
        Request(id="a", owner="x", seed=1, start=0, count=5, steps=4),
        Request(id="b", owner="y", seed=2, start=0, count=3, steps=4),
        Request(id="c", owner="y", seed=3, start=3, count=6, steps=6),
    ]
    if which == "dit":
        requests = [replace(r, labels=[11 * i for i in range(r.count)], guidance_scale=2.0) for r in requests]
    images, calls = {}, {}
    for k in (1, 4, None):
        config = EngineConfig(max_batch=32, max_decode_batch=k, keep_samples=True, invariant_rows=0)
        done, calls[k] = _decode_runs(DenoisingEngine(model, config), requests)
        images[k] = {r.id: (done[r.id].samples, done[r.id].pixels()) for r in requests}
    assert calls == {1: [1] * 14, 4: [4, 4, 4, 2], None: [8, 6]}
    for k in (4, None):
        for r in requests:
            (got, pixels), (want, want_pixels) = images[k][r.id], images[1][r.id]
            assert (got - want).abs().max() <= ATOL, (k, r.id)
            assert np.abs(pixels.astype(int) - want_pixels.astype(int)).max() <= 1, (k, r.id)


def test_a_decode_chunk_sized_by_memory_fits_rounds_down_to_a_bucket_and_is_capped():
    from undiffuse.engine import DECODE_BATCH_CAP, decode_batch_for_memory

    mib = 2**20
    assert DECODE_BATCH_CAP == 64
    assert decode_batch_for_memory(10 * mib, 100 * mib) == 1  # not even one image fits: still one
    assert decode_batch_for_memory(0, 100 * mib) == 1
    assert decode_batch_for_memory(-5, 100 * mib) == 1
    assert decode_batch_for_memory(2**50, 100 * mib) == 64  # huge: the cap
    assert decode_batch_for_memory(2**50, 0) == 64  # nothing measured: the cap
    # half of 1000 MiB at 100 MiB per image is 5 images: bucket 4
    assert decode_batch_for_memory(1000 * mib, 100 * mib) == 4
    assert decode_batch_for_memory(1000 * mib, 100 * mib, fraction=0.8) == 8
    assert decode_batch_for_memory(1600 * mib, 100 * mib) == 8  # exactly a bucket
    assert decode_batch_for_memory(1599 * mib, 100 * mib) == 4
    assert decode_batch_for_memory(2**50, mib, cap=24) == 24  # a cap that is no power of two is a bucket
    assert decode_batch_for_memory(44 * mib, mib, cap=24) == 16
    for free in range(0, 200 * mib, 7 * mib):
        k = decode_batch_for_memory(free, 3 * mib)
        assert k & (k - 1) == 0 and 1 <= k <= 64 and (k == 1 or k * 3 * mib <= free / 2)


def test_decode_settings_below_one_are_refused_and_the_decoder_never_compiles_to_cuda_graphs():
    from undiffuse.engine import _without_cuda_graphs

    for field, value in (("max_decode_batch", 0), ("max_decode_batch", -3), ("preview_decode_every", 0)):
        with pytest.raises(ValueError, match=rf"^{field} must be >= 1.*got {value}$"):
            EngineConfig(**{field: value})
    assert _without_cuda_graphs("reduce-overhead") == "default"
    assert _without_cuda_graphs("max-autotune") == "max-autotune-no-cudagraphs"
    assert _without_cuda_graphs("default") == "default"


class _Decoder:
    """Stands for engine.decoder: the real decoder, but a call for which `fails(call, images)`
    holds runs out of device memory as a CUDA decoder does (torch.cuda.OutOfMemoryError exists
    in CPU builds too), holding a tensor as a real call holds its activations. Each call checks
    that every tensor a failed call held, and the float output of every earlier call
    (`one_chunk_alive`), is gone by then."""

    def __init__(self, decoder, fails=lambda call, images: False, one_chunk_alive: bool = False) -> None:
        self.decoder, self.fails, self.one_chunk_alive = decoder, fails, one_chunk_alive
        self.calls: list[int] = []  # images per call, the failed calls included
        self.held: list[weakref.ref] = []
        self.outputs: list[weakref.ref] = []

    def __call__(self, x):
        assert all(ref() is None for ref in self.held), "a failed call's tensors outlive it"
        if self.one_chunk_alive:
            assert all(ref() is None for ref in self.outputs), "an earlier chunk's float images are alive"
        self.calls.append(x.shape[0])
        if self.fails(len(self.calls), x.shape[0]):
            activations = torch.empty(x.shape[0], 4096)
            self.held.append(weakref.ref(activations))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        out = self.decoder(x)
        self.outputs.append(weakref.ref(out))
        return out


def _run_with(model, config: EngineConfig, requests, decoder=None) -> tuple[DenoisingEngine, dict, list[int]]:
    """(engine, {id: (float images, uint8 images)}, images per successful decoder call)."""
    engine = DenoisingEngine(model, config)
    if decoder is not None:
        engine.decoder = decoder(engine.decoder)
    done, rows = _decode_runs(engine, requests)
    return engine, {k: (f.samples, f.pixels()) for k, f in done.items()}, rows


FINISH_TOGETHER = [  # a and b finish at step 4 (8 rows), c at step 6 (6 rows)
    Request(id="a", owner="x", seed=1, start=0, count=5, steps=4),
    Request(id="b", owner="y", seed=2, start=0, count=3, steps=4),
    Request(id="c", owner="y", seed=3, start=3, count=6, steps=6),
]


def test_a_decoder_out_of_memory_halves_the_chunk_for_good_and_makes_the_images_that_chunk_makes(ldm, caplog):
    """Chunks of 8 where only 2 images fit: the call of 8 fails, then the call of 4; the engine
    goes on at 2 per call, for this step's rows and later steps' (c's), with the failed calls'
    tensors released before each retry, and the images are, bit for bit, those of an engine
    set to decode 2 per call."""
    model = load_model(ldm[0])
    config = EngineConfig(max_batch=32, max_decode_batch=8, keep_samples=True, invariant_rows=0)
    made: list[_Decoder] = []

    def failing(decoder):
        made.append(_Decoder(decoder, fails=lambda call, images: images > 2))
        return made[-1]

    with caplog.at_level("WARNING", logger="undiffuse.engine"):
        engine, got, rows = _run_with(model, config, FINISH_TOGETHER, failing)
    assert made[0].calls == [8, 4, 2, 2, 2, 2, 2, 2, 2] and rows == [2] * 7
    assert engine.decode_batch == 2 and engine.decode_buckets == (1, 2)
    assert "decoder out of memory at 8 images per call; decoding 4 per call" in caplog.text
    assert "out of memory at 4 images per call; decoding 2 per call" in caplog.text
    assert "batch-invariant" not in caplog.text
    _, want, _ = _run_with(model, replace(config, max_decode_batch=2), FINISH_TOGETHER)
    for k in want:
        assert torch.equal(got[k][0], want[k][0]) and got[k][1].tobytes() == want[k][1].tobytes(), k


def test_a_decode_that_runs_out_of_memory_midway_goes_on_from_the_chunk_that_failed(ldm):
    """Fourteen rows finish at once, 4 per call; the third call fails: the first 8 images stay
    decoded, the rest are decoded 2 per call, and every image is the one a whole run makes
    (to the round-off of a different chunk, invariant_rows=0)."""
    model = load_model(ldm[0])
    together = [replace(r, steps=4) for r in FINISH_TOGETHER]
    config = EngineConfig(max_batch=32, max_decode_batch=4, keep_samples=True, invariant_rows=0)
    made: list[_Decoder] = []

    def failing(decoder):
        made.append(_Decoder(decoder, fails=lambda call, images: call == 3))
        return made[-1]

    engine, got, rows = _run_with(model, config, together, failing)
    assert made[0].calls == [4, 4, 4, 2, 2, 2] and rows == [4, 4, 2, 2, 2] and engine.decode_batch == 2
    _, want, _ = _run_with(model, config, together)
    for k in want:
        assert (got[k][0] - want[k][0]).abs().max() <= ATOL, k
        assert np.abs(got[k][1].astype(int) - want[k][1].astype(int)).max() <= 1, k


def test_batch_invariant_decoding_is_one_image_per_call_whatever_the_chunk_says(ldm):
    """invariant_rows > 0 decodes as DiffusionModel.decode does, one image per call: neither
    max_decode_batch nor set_decode_batch changes that."""
    model = load_model(ldm[0])
    config = EngineConfig(max_batch=32, max_decode_batch=4, keep_samples=True, invariant_rows=8)
    engine, got, rows = _run_with(model, config, FINISH_TOGETHER)
    assert engine.decode_batch == 1 and set(rows) == {1}
    engine.set_decode_batch(4)
    assert engine.decode_batch == 1


@pytest.mark.parametrize("invariant_rows", [8, 0])
def test_one_image_that_does_not_fit_raises_and_leaves_the_chunk_as_it_was(ldm, invariant_rows):
    """Batch-invariant slices of one image (the default there) cannot halve; nor does a
    one-image preview call help by halving a chunk of 16: the error reaches the engine loop,
    whose handler lowers max_batch (tests/core/test_engine_loop.py)."""
    model = load_model(ldm[0])
    config = EngineConfig(max_batch=32, invariant_rows=invariant_rows, preview_decode_every=1)
    engine = DenoisingEngine(model, config)
    engine.decoder = decoder = _Decoder(engine.decoder, fails=lambda call, images: True)
    before = engine.decode_batch
    assert before == (1 if invariant_rows else 16)
    engine.add(Request(id="a", owner="x", seed=1, start=0, count=3, steps=4, preview_every=1))
    with pytest.raises(torch.cuda.OutOfMemoryError):
        engine.step()  # its preview at step 1
    assert decoder.calls == [1] and engine.decode_batch == before


@pytest.mark.parametrize("keep_samples", [False, True])
def test_each_chunk_becomes_uint8_as_it_is_decoded_with_to_uint8s_pixels(ldm, keep_samples):
    """Without keep_samples a chunk's float images are gone before the next chunk is decoded
    (the decode holds one chunk of them, not every finishing row's); the uint8 images are
    exactly undiffuse.images.to_uint8 of the float images, with or without keeping them."""
    model = load_model(ldm[0])
    config = EngineConfig(max_batch=32, max_decode_batch=3, keep_samples=True, invariant_rows=0)
    made: list[_Decoder] = []

    def watched(decoder):
        made.append(_Decoder(decoder, one_chunk_alive=not keep_samples))
        return made[-1]

    _, kept, _ = _run_with(model, config, FINISH_TOGETHER)
    _, got, rows = _run_with(model, replace(config, keep_samples=keep_samples), FINISH_TOGETHER, watched)
    assert rows == [3, 3, 2, 3, 3] and made[0].calls == rows
    for k, (samples, pixels) in kept.items():
        assert pixels.dtype == np.uint8 and pixels.tobytes() == to_uint8(samples).tobytes(), k
        assert got[k][1].tobytes() == pixels.tobytes(), k
        assert (got[k][0] is None) != keep_samples and (got[k][0] is None or torch.equal(got[k][0], samples))


def test_pixels_are_converted_as_to_uint8_converts_them():
    from undiffuse.engine import _to_pixels

    levels = torch.arange(105, dtype=torch.float32) * 2.5 - 5  # whole and half levels, some outside [0, 255]
    x = torch.cat([torch.randn(3, 3, 5, 7) * 1.5, (levels / 127.5 - 1).view(1, 3, 5, 7)])
    for want, got in ((to_uint8(x), _to_pixels(x)), (to_uint8(x), _to_pixels(x, torch.empty(4, 5, 7, 3).byte()))):
        assert got.dtype == torch.uint8 and np.array_equal(got.numpy(), want)
    before = x.clone()
    _to_pixels(x)
    assert torch.equal(x, before)  # the input is left as it is (a pixel model's rows may be kept)


def test_the_memory_a_decoder_reserves_and_what_the_networks_are_sized_from():
    """decode_reserve and rows_for_memory: pure arithmetic (the device's numbers go in on CUDA)."""
    from undiffuse.engine import decode_reserve, rows_for_memory

    mib = 2**20
    assert decode_reserve(None, 100 * mib) == 0  # not sized yet
    assert decode_reserve(8, None) == 0 and decode_reserve(8, 0) == 0  # not measured: a CPU, a pixel model
    assert decode_reserve(8, 100 * mib) == 800 * mib
    # 1000 MiB free + 200 cached, 10 MiB per row, 80 %: 96 rows; less 700 MiB of decoders: 40
    assert rows_for_memory(1000 * mib, 200 * mib, 10 * mib, 1000) == 96
    assert rows_for_memory(1000 * mib, 200 * mib, 10 * mib, 1000, decode_reserved_bytes=700 * mib) == 40
    assert rows_for_memory(1000 * mib, 200 * mib, 10 * mib, 1000, fraction=0.5, decode_reserved_bytes=700 * mib) == 25
    assert rows_for_memory(1000 * mib, 200 * mib, 10 * mib, 32, decode_reserved_bytes=700 * mib) == 32  # the setting
    assert rows_for_memory(1000 * mib, 200 * mib, 10 * mib, 1000, decode_reserved_bytes=5000 * mib) == 1  # at least 1
    assert rows_for_memory(10, 0, 0, 1000, fraction=1.0) == 10  # nothing measured: a byte per row
    assert rows_for_memory(0, 0, mib, 1000, decode_reserved_bytes=-mib) == 1


def test_an_engine_reserves_its_chunk_at_the_measured_bytes_per_image(ldm):
    """decode_reserved_bytes: 0 on a CPU (nothing measured) and for a pixel model; decode_batch
    images at the bytes measured for one (set here as CUDA's measurement sets them), halved with
    the chunk after running out of memory; set_decode_batch(None) goes back to the default."""
    model = load_model(ldm[0])
    engine = DenoisingEngine(model, EngineConfig(max_batch=32, max_decode_batch=8, invariant_rows=0))
    assert engine.decode_reserved_bytes == 0
    engine.warm_up(5)  # a CPU measures nothing, and keeps its chunk
    assert engine.decode_reserved_bytes == 0 and engine.decode_batch == 8
    engine._decode_bytes = 3000  # what _measure_decode finds on CUDA
    assert engine.decode_reserved_bytes == 8 * 3000
    engine.decoder = _Decoder(engine.decoder, fails=lambda call, images: images > 4)
    _decode_runs(engine, [Request(id="a", owner="x", seed=1, start=0, count=8, steps=2)])
    assert engine.decode_batch == 4 and engine.decode_reserved_bytes == 4 * 3000
    engine.set_decode_batch(None)
    assert (engine.decode_batch, engine.decode_buckets) == (8, (1, 2, 4, 8))
    engine.set_decode_batch(2)
    assert (engine.decode_batch, engine.decode_buckets) == (2, (1, 2))
    with pytest.raises(ValueError, match="got 0"):
        engine.set_decode_batch(0)
    assert DenoisingEngine(model, EngineConfig(invariant_rows=0)).decode_batch == 16  # CPU default, unset
    pixel = DenoisingEngine(load_model(DEMO_MODEL), EngineConfig(max_batch=8))
    pixel.warm_up(5)
    assert pixel.decoder is None and pixel.decode_reserved_bytes == 0
