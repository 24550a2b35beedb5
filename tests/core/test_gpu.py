"""CUDA checks: run on a GPU machine, skipped cleanly elsewhere (see tests/conftest.py)."""

import contextlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from undiffuse import DDIMSampler, DDPMSampler, ImageNoise, load_model

pytestmark = pytest.mark.gpu
MODEL = Path(__file__).resolve().parents[2] / "models" / "mnist"


@contextlib.contextmanager
def _never_synchronizing():
    """A stepping window that must not wait on the device: an operation the sync debug mode
    flags (a device-to-host read) raises, and so does an explicit synchronization of the
    device, a stream or an event, a memory query or emptying the cache, which that mode does
    not flag."""

    def refuse(what: str):
        def refused(*args, **kwargs):
            raise AssertionError(f"{what} inside a stepping window")

        return refused

    with pytest.MonkeyPatch.context() as mp:
        for owner, name in (
            (torch.cuda, "synchronize"),
            (torch.cuda, "mem_get_info"),
            (torch.cuda, "empty_cache"),
            (torch.cuda.Stream, "synchronize"),
            (torch.cuda.Event, "synchronize"),
        ):
            mp.setattr(owner, name, refuse(f"{getattr(owner, '__name__', owner)}.{name}"))
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode("default")


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


def _digits(count: int, steps: int):
    from undiffuse.engine import Request

    return [
        Request(k, "gpu", seed=0, start=16 * k, count=16, steps=steps, labels=[(16 * k + i) % 10 for i in range(16)])
        for k in range(count // 16)
    ]


def _engine_pixels(model, config, requests) -> torch.Tensor:
    from undiffuse.engine import DenoisingEngine

    engine = DenoisingEngine(model, config)
    for r in requests:
        engine.add(r)
    done = []
    while not engine.idle:
        done += engine.step()
    return torch.cat([torch.from_numpy(f.pixels()) for f in sorted(done, key=lambda f: f.id)]).int()


def _within_stated_tolerance(a: torch.Tensor, b: torch.Tensor) -> None:
    """docs/benchmarks.md states it: against fp32, a pixel moves by at most 1.5 of 255 levels on
    average, 95 % of pixels by at most 8, and no image by more than 10 on average (the largest
    single pixel can move much more: a trajectory amplifies a small change into a shifted
    stroke). Measured in bf16 on an NVIDIA H200 (DDIM 50, 100 digits): 1.09, 97.2 %, 7.12; the
    first bound (1.0, 99 %, 4, from the CPU's bf16: 0.36, 99.7 %, 1.99) failed there at a mean of
    1.13 (DDIM 20, 64 digits). The class accuracy is unchanged (bench/engine.py row 5)."""
    d = (a - b).abs().float()
    assert d.mean() <= 1.5
    assert (d <= 8).float().mean() >= 0.95
    assert d.flatten(1).mean(1).max() <= 10.0


def test_engine_bf16_and_compile_stay_within_the_stated_tolerance():
    from undiffuse.engine import EngineConfig

    model = load_model(MODEL, "cuda")
    reqs = _digits(64, 20)
    fp32 = _engine_pixels(model, EngineConfig(max_batch=64, precision="fp32", compile=False), reqs)
    bf16 = _engine_pixels(model, EngineConfig(max_batch=64, precision="bf16", compile=False), reqs)
    # one bucket (64: every step of these requests fills it) keeps the compile to one graph
    one = dict(max_batch=64, precision="bf16", compile=True, buckets=(64,))
    compiled = _engine_pixels(model, EngineConfig(**one, step_graphs=False), reqs)
    graphs = _engine_pixels(
        model, EngineConfig(**one, compile_mode="reduce-overhead", step_graphs=False), reqs
    )  # torch.compile's CUDA graphs of the network: 4.5-5.4x fp32 eager at batch 64 on an H200
    step_graphs = _engine_pixels(model, EngineConfig(**one), reqs)  # the default: each step one CUDA graph
    _within_stated_tolerance(fp32, bf16)
    _within_stated_tolerance(fp32, compiled)
    _within_stated_tolerance(fp32, graphs)
    _within_stated_tolerance(fp32, step_graphs)


def test_step_graphs_replay_the_launched_steps_bit_for_bit_and_never_synchronize():
    """A compiled engine on CUDA records each step as one CUDA graph (undiffuse.step_graph, the
    default): the demo model's images are those of the same engine launching every op (the
    same kernels at the same shapes; a graph's padding rows are zeros, not copies), for DDIM with
    guided rows and their twins, for DDPM's noise draws, and for both at once, with requests
    joining a running graph; its steady steps are replays that issue no synchronizing call."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    model = load_model(MODEL, "cuda")
    ddim = _digits(48, 12)
    ddim[1] = replace(ddim[1], guidance_scale=3.0)  # its twins ride in the same call
    ddpm = [replace(r, id=f"ddpm-{r.id}", sampler="ddpm", seed=9) for r in _digits(32, 10)]
    mixed = [replace(r, id=f"mixed-{r.id}", seed=5) for r in ddim[:1] + ddpm[:1]]
    arrivals = {0: ddim[:1], 2: ddim[1:], 20: ddpm, 40: mixed}  # DDPM once the DDIM rows have left
    out = {}
    for graphs in (False, True):
        config = EngineConfig(max_batch=64, precision="bf16", buckets=(16, 64), keep_samples=True,
                              latency_slack=None, step_graphs=graphs)  # fmt: skip
        engine = DenoisingEngine(model, config)
        assert engine.compiled and engine.step_graphs == graphs
        done, k, replayed = {}, 0, 0
        while not engine.idle or k <= max(arrivals):
            for r in arrivals.get(k, []):
                engine.add(r)
            if graphs and k == 5:  # a steady DDIM batch, its graph recorded at k = 2
                assert engine._batch.graph is not None and engine._batch.graph.graph is not None
                with _never_synchronizing():
                    for _ in range(3):
                        assert engine.step() == []
                k += 3
                continue
            for f in engine.step():
                done[f.id] = f
            replayed += engine._batch is not None and engine._batch.graph is not None
            k += 1
        out[graphs] = done
        if graphs:
            keys = set(engine._graphs)
            assert {key.noise for key in keys} == {False, True} and {key.rows for key in keys} >= {16, 64}, keys
            assert any(key.guided for key in keys), keys
            assert replayed > 15
    assert set(out[True]) == {r.id for r in ddim + ddpm + mixed}
    for rid, want in out[False].items():
        got = out[True][rid].samples
        assert torch.equal(got, want.samples), (rid, (got - want.samples).abs().max().item())


def test_engine_steps_never_synchronize_the_device():
    """Steady-state steps (a stable batch) issue no synchronizing CUDA call."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    engine = DenoisingEngine(load_model(MODEL, "cuda"), EngineConfig(max_batch=64, compile=False))
    for r in _digits(32, 30):
        engine.add(r)
    engine.step()  # assembles the batch (host-to-device copies of its row tables)
    with _never_synchronizing():
        for _ in range(10):
            assert engine.step() == []


def test_a_compiling_engine_equals_a_compiled_sampler_on_cuda_and_its_steps_never_synchronize():
    """On CUDA an engine compiles by default: its sampler update and noise draws are compiled
    kernels shared with `Sampler.compile`, so with a row-wise network every image equals a
    compiled Sampler.sample bit for bit (mixed samplers, noise, histories, guidance); and its
    steady steps, draws included, issue no synchronizing call."""
    from tests.core.test_engine import REQUESTS, TINY, RowWise, run
    from undiffuse import DiffusionModel, ModelConfig, ScheduleConfig
    from undiffuse.engine import DenoisingEngine, EngineConfig
    from undiffuse.registry import make_sampler

    class OnTheDevice(RowWise):  # a buffer that says where the model lives (RowWise has no weights)
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("anchor", torch.zeros(1))

    rowwise = DiffusionModel.from_config(OnTheDevice(), ModelConfig(TINY, ScheduleConfig(num_timesteps=200)))
    rowwise = rowwise.to("cuda")
    engine = DenoisingEngine(rowwise, EngineConfig(max_batch=64, keep_samples=True, latency_slack=None))
    assert engine.compiled  # the default on CUDA
    engine.network = rowwise.network  # the update and the draws compiled, not the network
    done = run(engine, {0: REQUESTS[:3], 2: REQUESTS[3:6], 5: REQUESTS[6:]})
    for r in REQUESTS:
        sampler = make_sampler(r.sampler, rowwise.schedule, **r.options).compile()
        want = sampler.sample(
            rowwise.eps,
            rowwise.image_shape,
            steps=r.steps,
            noise=ImageNoise([r.seed] * r.count, list(range(r.start, r.start + r.count)), device="cuda"),
            class_labels=torch.tensor(list(r.labels), device="cuda"),
            guidance_scale=r.guidance_scale,
            guidance_interval=rowwise.guidance_interval,
            device="cuda",
        )
        assert torch.equal(done[r.id].samples, want), r.id
    # steady steps of noise-drawing samplers, after the first steps compiled their graphs
    for r in REQUESTS:
        engine.add(replace(r, id=f"again-{r.id}", steps=30))
    for _ in range(3):
        engine.step()
    with _never_synchronizing():
        for _ in range(5):
            assert engine.step() == []


def test_max_batch_follows_free_memory():
    from undiffuse.engine import max_batch_for_memory

    model = load_model(MODEL, "cuda")
    assert max_batch_for_memory(model, 64) == 64  # the demo model fits 64 rows on any CUDA card
    free, _ = torch.cuda.mem_get_info()
    assert 1 <= max_batch_for_memory(model, 10**9) < 10**9 and free > 0


def test_previews_never_synchronize_the_device_and_match_the_cpu():
    """A previewing request in a steady batch adds no synchronizing CUDA call (its x0 rows go to
    pinned memory asynchronously), and its previews are the CPU engine's within round-off."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    reqs = _digits(32, 30)
    reqs[0] = replace(reqs[0], preview_every=3)
    previews = {}
    for device in ("cpu", "cuda"):
        engine = DenoisingEngine(load_model(MODEL, device), EngineConfig(max_batch=64, precision="fp32", compile=False))
        for r in reqs:
            engine.add(r)
        engine.step()  # assembles the batch
        with _never_synchronizing() if device == "cuda" else contextlib.nullcontext():
            for _ in range(10):
                assert engine.step() == []
            made = engine.take_previews()
        assert [(p.id, p.step) for p in made] == [(0, 3), (0, 6), (0, 9)]
        previews[device] = torch.stack([torch.from_numpy(p.pixels()) for p in made]).int()
    assert previews["cuda"].shape == (3, 28, 28, 1)
    assert (previews["cpu"] - previews["cuda"]).abs().float().mean() <= 2.0


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory):
    """tests/core/test_latent_models.py's tiny LDMPipeline (UNet on VQModel latents)."""
    from tests.core.test_latent_models import _ldm

    folder = tmp_path_factory.mktemp("ldm") / "ldm"
    _ldm(folder)
    return folder


def _latent_requests():
    """a and b finish together at step 6 (8 rows), c three steps later; b previews at 2 and 4."""
    from undiffuse.engine import Request

    return [
        Request(id="a", owner="gpu", seed=1, start=0, count=5, steps=6),
        Request(id="b", owner="gpu", seed=2, start=0, count=3, steps=6, preview_every=2),
        Request(id="c", owner="gpu", seed=3, start=0, count=6, steps=9),
    ]


def _run_latent(engine, inline: bool):
    """Every request of _latent_requests to the end; ({id: (samples or None, pixels)}, preview
    pixels). Pixels are read only once the engine is idle: a's and b's after c's further steps."""
    if inline:
        engine._side.stream = None  # the same arithmetic, on the main stream
    for r in _latent_requests():
        engine.add(r)
    done = {}
    while not engine.idle:
        done.update((f.id, f) for f in engine.step())
    previews = [torch.from_numpy(p.pixels()).int() for p in engine.take_previews()]
    kept = {k: None if f.samples is None else f.samples.cpu() for k, f in done.items()}
    return {k: (kept[k], torch.from_numpy(f.pixels()).int()) for k, f in done.items()}, previews


def _same(got, want):
    """The same images: float samples (where kept) equal to 1e-5, relative where |x| > 1
    (random weights carry latents far from unit scale), and pixels within one level."""
    assert got.keys() == want.keys()
    for k, (samples, pixels) in want.items():
        if samples is not None:
            assert ((got[k][0] - samples).abs() / samples.abs().clamp(min=1)).max() <= 1e-5, k
        assert got[k][1].shape == pixels.shape and (got[k][1] - pixels).abs().max() <= 1, k


@pytest.mark.parametrize("keep_samples", [False, True])
def test_latent_decodes_run_on_a_side_stream_and_equal_the_main_streams(ldm_folder, keep_samples):
    """Finished rows and previews decode on the engine's side stream, after the step that made
    them, into the images the main stream makes, with every step held back on the main stream
    (a decode that did not wait for its step would read unfinished latents). Without
    keep_samples every decode is also held back on the side stream while the main stream goes
    on with c's steps (latents whose memory went back to the main stream early would be
    overwritten by them); with it, the kept float images equal the main stream's to 1e-5."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    model = load_model(ldm_folder, "cuda")
    config = EngineConfig(
        max_batch=32,
        precision="fp32",
        compile=False,
        keep_samples=keep_samples,
        max_decode_batch=4,
        preview_decode_every=1,
    )
    streams = []
    model.network.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(2_000_000))
    model.decoder.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(20_000_000))
    model.decoder.register_forward_hook(lambda module, args, out: streams.append(torch.cuda.current_stream()))
    side = DenoisingEngine(model, config)
    assert side._side.stream is not None and side._side.stream != torch.cuda.current_stream()
    got, got_previews = _run_latent(side, inline=False)
    assert len(streams) == 6 and all(s == side._side.stream for s in streams)  # 2 + 2 chunks, 2 previews
    streams.clear()
    want, want_previews = _run_latent(DenoisingEngine(model, config), inline=True)
    assert len(streams) == 6 and all(s == torch.cuda.current_stream() for s in streams)
    _same(got, want)
    assert all(samples is not None for samples, _ in got.values()) == keep_samples
    assert len(got_previews) == len(want_previews) == 2
    for p, q in zip(got_previews, want_previews, strict=True):
        assert p.shape == (16, 16, 3) and (p - q).abs().max() <= 1


def test_latent_steps_that_finish_rows_never_synchronize_the_device(ldm_folder):
    """The decode chunk is sized by memory at warm-up (its one synchronization); afterwards
    steps that decode previews and finished rows issue no synchronizing CUDA call
    (_never_synchronizing: the explicit ones too, which the sync debug mode does not flag)."""
    from undiffuse.engine import DECODE_BATCH_CAP, DenoisingEngine, EngineConfig

    config = EngineConfig(max_batch=32, compile=False, preview_decode_every=1)
    engine = DenoisingEngine(load_model(ldm_folder, "cuda"), config)
    assert engine.decode_batch is None  # not sized until warm-up or the first decode
    engine.warm_up(60)
    k = engine.decode_batch
    assert 1 <= k <= DECODE_BATCH_CAP and k & (k - 1) == 0 and engine.decode_buckets[-1] == k
    for r in _latent_requests():
        engine.add(r)
    engine.step()  # assembles the batch
    with _never_synchronizing():
        done = []
        for _ in range(5):  # steps 2 to 6: b's previews at 2 and 4, a and b finish at 6
            done += engine.step()
        made = engine.take_previews()
    assert sorted(f.id for f in done) == ["a", "b"] and [p.step for p in made] == [2, 4]
    assert [f.pixels().shape for f in sorted(done, key=lambda f: f.id)] == [(5, 16, 16, 3), (3, 16, 16, 3)]


def test_the_decode_chunk_is_sized_at_the_first_decode_without_a_warm_up(ldm_folder):
    """Unsized through the steps before the first decode (b's preview at step 5), sized by the
    step that makes it, with the decoder's memory measured and reserved at that chunk."""
    from undiffuse.engine import DECODE_BATCH_CAP, DenoisingEngine, EngineConfig

    engine = DenoisingEngine(load_model(ldm_folder, "cuda"), EngineConfig(max_batch=32, compile=False))
    for r in _latent_requests():
        engine.add(r)
    steps = 0
    while True:
        assert engine.decode_batch is None and engine.decode_reserved_bytes == 0, steps
        done, made = engine.step(), engine.take_previews()
        steps += 1
        if done or made:
            break
    assert steps == 5 and [p.step for p in made] == [5] and not done
    k = engine.decode_batch
    assert k is not None and 1 <= k <= DECODE_BATCH_CAP and k & (k - 1) == 0
    assert engine.decode_reserved_bytes > 0 and engine.decode_reserved_bytes % k == 0
    assert made[0].pixels().shape == (16, 16, 3)
    while not engine.idle:
        done += engine.step()
    assert engine.decode_batch == k and sorted(f.pixels().shape[0] for f in done) == [3, 5, 6]


def test_a_decoder_out_of_memory_on_the_side_stream_halves_the_chunk_and_keeps_the_images(ldm_folder):
    """A decoder that fits 2 images per call, set to 4: after the failed call (on the side
    stream, with its inputs recorded there) the cache is emptied and the decode goes on at 2 per
    call; the images equal those of an engine set to 2 per call, inline."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    model = load_model(ldm_folder, "cuda")
    config = EngineConfig(max_batch=32, precision="fp32", compile=False, keep_samples=True, max_decode_batch=4)
    engine = DenoisingEngine(model, config)
    decode, calls = engine.decoder, []

    def fits_two(z):
        calls.append(z.shape[0])
        if z.shape[0] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return decode(z)

    engine.decoder = fits_two
    got, got_previews = _run_latent(engine, inline=False)
    # b's preview at step 5 (one image), a's and b's 8 rows at step 6 (4 fails), c's 6 at step 9
    assert calls == [1, 4, 2, 2, 2, 2, 2, 2, 2] and engine.decode_batch == 2
    want, want_previews = _run_latent(DenoisingEngine(model, replace(config, max_decode_batch=2)), inline=True)
    _same(got, want)
    assert all((p - q).abs().max() <= 1 for p, q in zip(got_previews, want_previews, strict=True))


def test_decoders_reserve_their_chunk_and_networks_are_sized_without_it(ldm_folder):
    """After warm-up a latent engine reserves decode_batch x its measured bytes per image, also
    with a pinned chunk; max_batch_for_memory leaves the reservation out of the networks' room."""
    from undiffuse.engine import DenoisingEngine, EngineConfig, max_batch_for_memory

    model = load_model(ldm_folder, "cuda")
    sized = DenoisingEngine(model, EngineConfig(max_batch=16, compile=False))
    sized.warm_up(60)
    pinned = DenoisingEngine(model, EngineConfig(max_batch=16, compile=False, max_decode_batch=3))
    pinned.warm_up(60)
    assert pinned.decode_batch == 3 and pinned.decode_reserved_bytes > 0
    per_image = pinned.decode_reserved_bytes // 3
    per_sized = sized.decode_reserved_bytes // sized.decode_batch  # the same decoder: about the same bytes
    assert sized.decode_reserved_bytes % sized.decode_batch == 0 and 0.5 <= per_sized / per_image <= 2
    free, _total = torch.cuda.mem_get_info()
    whole = max_batch_for_memory(model, 10**9)
    half = max_batch_for_memory(model, 10**9, decode_reserved_bytes=(free + torch.cuda.memory_reserved()) // 2)
    assert 1 <= half < whole and max_batch_for_memory(model, 10**9, decode_reserved_bytes=10**15) == 1


def test_the_engine_loop_sizes_two_latent_engines_and_serves_both(ldm_folder):
    """SetMaxBatch on two latent engines of one GPU: both networks sized and warmed, then both
    decoders sized (the second from what the first left) and measured; requests on both finish."""
    from undiffuse.engine import DenoisingEngine, EngineConfig
    from undiffuse.engine_loop import Add, EngineLoop, SetMaxBatch

    class Listener:
        def __init__(self):
            self.done, self.errors = {}, {}

        def finished(self, rid, finished):
            self.done[rid] = finished

        def failed(self, rid, error):
            self.errors[rid] = error

        def previews(self, previews):
            pass

    engines = {
        name: DenoisingEngine(load_model(ldm_folder, "cuda"), EngineConfig(max_batch=64, compile=False))
        for name in ("one", "two")
    }
    listener = Listener()
    loop = EngineLoop(engines, listener, min_batch=8, warmup_seconds=60)
    command = SetMaxBatch(64)
    loop.submit(command)
    loop.run_once()
    assert command.done.result(timeout=0) is None
    for engine in engines.values():
        assert 8 <= engine.config.max_batch <= 64 and engine.decode_batch and engine.decode_reserved_bytes > 0
    for name in engines:
        for r in _latent_requests():
            loop.submit(Add(name, replace(r, id=(name, r.id))))
    for _ in range(100):
        if not loop.run_once():
            break
    assert not listener.errors and len(listener.done) == 6
    assert all(f.pixels().shape[1:] == (16, 16, 3) for f in listener.done.values())


def test_a_compiled_latent_engine_decodes_on_the_side_stream_as_on_the_main_stream(ldm_folder):
    """The network in CUDA graphs (reduce-overhead) on the main stream, the decoder compiled
    without them on the side stream: the images the same engine makes inline."""
    from undiffuse.engine import DenoisingEngine, EngineConfig

    model = load_model(ldm_folder, "cuda")
    config = EngineConfig(
        max_batch=16,
        buckets=(16,),  # one network graph
        precision="fp32",
        compile=True,
        compile_mode="reduce-overhead",
        keep_samples=True,
        max_decode_batch=8,
        preview_decode_every=1,
    )
    got, got_previews = _run_latent(DenoisingEngine(model, config), inline=False)
    want, want_previews = _run_latent(DenoisingEngine(model, config), inline=True)
    _same(got, want)
    assert all((p - q).abs().max() <= 1 for p, q in zip(got_previews, want_previews, strict=True))
