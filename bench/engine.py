"""The denoising engine against its references, side by side in one run; one markdown table.

    python bench/engine.py                 # CPU section (2 cores: a few minutes)
    python bench/engine.py --gpu           # + GPU section (one H200: about 2 minutes, compile caches warm; (8), (9) more)
    python bench/engine.py --gpu --smoke   # the GPU section's code paths, tiny, on any device
    python bench/engine.py --models-only   # only (8) and (9), tiny (2 cores: under 2 minutes)
    python bench/engine.py --gpu --skip-cpu --models-only   # (8) and (9) at real size (sized for a few GPU minutes)

CPU section (the demo model, models/mnist):
  (1) throughput: DDIM, a batch of images through the engine exactly as the Denoiser drives it,
      against Sampler.sample on the same images (the one-request loop) -> ratio;
  (2) mixed load: 1-image 10-step DDIM jobs arriving every `--short-every` seconds while
      1,000-step DDPM jobs run: p50 completion of the short jobs against their time alone, and
      total images/s against static batching (each batch runs all its steps before the next
      starts: the Denoiser before the engine) on the same arrivals;
  (2, flat) the same load with a network that costs 9 ms per call whatever its rows (a GPU
      below saturation) and returns zeros: the scheduling and the engine's own cost per step
      where merging is free, against static batching.
GPU section:
  (3) demo model, DDIM 50, through the engine at large batch: images/s (goal >= 4,000 on one
      H100), fp32 eager, bf16 eager and the engine's fast path (bf16, channels_last, compile);
  (3b) the same at batch 64 (launch-bound): compile with and without CUDA graphs;
  (4) a CIFAR-10-sized DDPM UNet (diffusers UNet2DModel, 35.7 M parameters), DDIM 20, batch 256:
      the engine's fast path against diffusers' DDIMPipeline in fp32 (goal >= 1,200 images/s and
      >= 6x), with achieved TFLOP/s and the fraction of the card's bf16 peak;
  (6) host time (CPU): an engine step's bookkeeping with a network that costs nothing;
  (7) guided packing (CPU, any device's count): network calls for a burst of guided shards when
      their null-class twins are priced only where they run, against pricing them at every step;
  (5) precision (CPU and GPU): the largest pixel difference of bf16 from fp32 on the same 100
      digits, and the class accuracy of each by 5-NN on the shared MNIST test set;
  (2, GPU) the mixed load of (2) on the GPU (fp32 eager, short jobs every 0.25 s).
Models people bring, in each section asked for (--size: tiny on the CPU, real on a GPU; random
weights, nothing downloaded), images/s with decoding to host pixels included, against diffusers'
own pipeline on the same weights and steps in the same run:
  (8) a 256x256 pixel UNet (google/ddpm-church-256's UNet2DModel, 113.7 M parameters), DDIM,
      against DDIMPipeline;
  (9) DiT-XL/2 (DiTTransformer2DModel, 28 x 1152, patch 2 on 4 x 32 x 32 latents, 1000 classes,
      learned variances) at guidance 4 with Stable Diffusion's AutoencoderKL decoder (256x256),
      DDIM, against DiTPipeline;
  each with its parameters and GFLOP per image and network call (FlopCounterMode on the meta
  device); the engine in fp32 (the reference's precision), on a GPU also bf16 (and bf16 +
  compile with --compile-models). Tiny: the same architectures with fewer channels and layers,
  64 px images.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from undiffuse import ImageNoise, load_model
from undiffuse.engine import DenoisingEngine, EngineConfig, Request, model_device

ROOT = Path(__file__).resolve().parent.parent
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense bf16, per vendor sheets


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_engine(engine: DenoisingEngine, requests: list[Request]) -> float:
    """Seconds to finish requests added at once (pixels on the host included)."""
    sync()
    start = time.perf_counter()
    for r in requests:
        engine.add(r)
    pending = []
    while not engine.idle:
        pending += engine.step()
    for f in pending:
        f.pixels()
    return time.perf_counter() - start


def run_sampler(model, requests: list[Request]) -> float:
    """Seconds for Sampler.sample over the same images, one request after the other."""
    device = model_device(model)
    sync()
    start = time.perf_counter()
    for r in requests:
        sampler = model.make_sampler(r.sampler, **r.options)
        x = sampler.sample(
            model.eps,
            model.image_shape,
            steps=r.steps,
            noise=ImageNoise([r.seed] * r.count, range(r.start, r.start + r.count), device),
            class_labels=torch.tensor(r.labels, device=device) if r.labels else None,
            device=device,
        )
        ((x.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    sync()
    return time.perf_counter() - start


def digits(count: int, steps: int, job: str = "b", sampler: str = "ddim", owner: str = "bench") -> list[Request]:
    """count images of the demo model in shards of 16, classes in turn."""
    out = []
    for k, start in enumerate(range(0, count, 16)):
        n = min(16, count - start)
        out.append(
            Request((job, k), owner, seed=0, start=start, count=n, steps=steps, sampler=sampler,
                    labels=[(start + i) % 10 for i in range(n)])
        )  # fmt: skip
    return out


# --- (1) throughput ---------------------------------------------------------------------------
def throughput(model, images: int, steps: int, max_batch: int) -> list[str]:
    engine = DenoisingEngine(model, EngineConfig(max_batch=max_batch, compile=False))
    run_engine(engine, digits(16, 2))  # warm-up
    t_engine = min(run_engine(engine, digits(images, steps)) for _ in range(2))
    t_ref = min(run_sampler(model, digits(images, steps)) for _ in range(2))
    return [
        f"| (1) DDIM {steps}, {images} images: engine vs Sampler.sample per shard | {images / t_ref:.1f} img/s "
        f"| {images / t_engine:.1f} img/s | {t_ref / t_engine:.2f}x | - |"
    ]


class StaticBatches:
    """Static batching in an engine: what waits is grouped by (sampler, steps), and each group runs
    to completion before the next is added (no request joins a running batch)."""

    def __init__(self, model, max_batch: int, settings: dict, step_time: dict[int, float]) -> None:
        self.engine = DenoisingEngine(model, EngineConfig(max_batch=max_batch, **settings))
        self.engine.step_time = dict(step_time)
        self.waiting: list[Request] = []
        self.groups: list[list[Request]] = []

    def idle(self) -> bool:
        return self.engine.idle and not self.waiting and not self.groups

    def step(self) -> list:
        """One step of the running group (the next group first, once it is done): finished ids."""
        if self.engine.idle:
            if not self.groups:
                grouped: dict[tuple, list[Request]] = {}
                for r in self.waiting:
                    grouped.setdefault((r.sampler, r.steps), []).append(r)
                self.groups, self.waiting = list(grouped.values()), []
            for r in self.groups.pop(0) if self.groups else []:
                self.engine.add(r)
        return [f.id for f in self.engine.step()]


# --- (2) mixed load -----------------------------------------------------------------------------
def mixed_load(model, args, config: dict | None = None) -> list[str]:
    """Short jobs every short_every s while long DDPM jobs run; engine vs static batching.

    config: the engines' EngineConfig settings (default: fp32 eager, `compile=False`), and
    static batching's reference is then the same kind of engine fed one batch at a time (each
    (sampler, steps) group of what waits runs to completion before the next is added): the same
    kernels, compiled and graphed alike, so the ratio is the scheduling's. Without config static
    batching is `Sampler.sample` over each group (fp32 eager, the original row)."""
    settings = dict(config or {"compile": False})
    long_jobs = [
        r
        for j in range(args.long_jobs)
        for r in digits(args.long_images, args.long_steps, job=f"long{j}", sampler="ddpm", owner=f"long{j}")
    ]
    shorts = [
        (i * args.short_every, Request(("short", i), f"short{i}", seed=i, start=0, count=1, steps=10, labels=[i % 10]))
        for i in range(args.short_jobs)
    ]
    # a short job alone, on an idle engine
    warm = DenoisingEngine(model, EngineConfig(max_batch=args.max_batch, **settings))
    warm.warm_up(60)
    alone = statistics.median(run_engine(warm, [shorts[0][1]]) for _ in range(5))

    def drive(step_fn, add_fn, idle_fn) -> tuple[list[float], float]:
        start = time.perf_counter()
        for r in long_jobs:
            add_fn(r, 0.0)
        queue, done_at = list(shorts), {}
        while queue or not idle_fn():
            now = time.perf_counter() - start
            while queue and queue[0][0] <= now:
                arrival, r = queue.pop(0)
                add_fn(r, arrival)
            if idle_fn():
                time.sleep(max(0.0, queue[0][0] - now))
                continue
            for rid in step_fn():
                done_at[rid] = time.perf_counter() - start
        arrivals = dict((r.id, a) for a, r in shorts)
        latency = [done_at[rid] - arrivals[rid] for rid in arrivals]
        return latency, time.perf_counter() - start

    # static batching: a batch (everything waiting, compatible requests together) runs to completion
    waiting: list[Request] = []
    static_engine = StaticBatches(model, args.max_batch, settings, warm.step_time) if config else None

    def static_step() -> list:
        batch, waiting[:] = list(waiting), []
        groups: dict[tuple, list[Request]] = {}
        for r in batch:
            groups.setdefault((r.sampler, r.steps), []).append(r)
        finished = []
        for group in groups.values():
            merged = Request("g", "g", seed=0, start=0, count=sum(r.count for r in group), steps=group[0].steps,
                             sampler=group[0].sampler, labels=[c for r in group for c in r.labels])  # fmt: skip
            run_sampler(model, [merged])  # same compute as the group's own seeds
            finished += [r.id for r in group]
        return finished

    static_drive = (
        (static_step, lambda r, a: waiting.append(r), lambda: not waiting)
        if static_engine is None
        else (static_engine.step, lambda r, a: static_engine.waiting.append(r), static_engine.idle)
    )
    # alternate the two, repeats times each, and keep each one's best span (and its latencies)
    runs: dict[str, list[tuple[float, list[float]]]] = {"engine": [], "static": []}
    steps: list[list[tuple[float, int, str]]] = []  # each engine run's (seconds, rows, sampler) per step
    for _ in range(args.repeats):
        engine = DenoisingEngine(model, EngineConfig(max_batch=args.max_batch, **settings))
        engine.step_time = dict(warm.step_time)  # the table the Denoiser measures at start
        lat, span = drive(
            lambda e=engine: [f.id for f in e.step()], lambda r, a, e=engine: e.add(r), lambda e=engine: e.idle
        )
        runs["engine"].append((span, lat))
        sync()  # every step's end event has passed: step_times reads them all
        steps.append(engine.step_times())
        lat, span = drive(*static_drive)
        runs["static"].append((span, lat))
    span_engine, lat_engine = min(runs["engine"])
    span_static, lat_static = min(runs["static"])
    # how the engine spent its best run: its steps by sampler ("mixed": long and short rows in one
    # step) and their mean time (GPU time between CUDA events on CUDA, wall time on a CPU)
    best = steps[min(range(len(runs["engine"])), key=lambda i: runs["engine"][i][0])]
    kinds: dict[str, list[float]] = {}
    for sec, _, sampler in best:
        kinds.setdefault(sampler, []).append(sec)
    per_kind = ", ".join(f"{len(v)} {k} ({statistics.mean(v) * 1e3:.2f} ms)" for k, v in sorted(kinds.items()))
    static_calls = args.long_jobs * args.long_steps + 10 * args.short_jobs  # at most: shorts may share a group
    images = sum(r.count for r in long_jobs) + args.short_jobs
    p50_e, p50_s = statistics.median(lat_engine), statistics.median(lat_static)
    load = (
        f"{args.long_jobs} x {args.long_images}-image DDPM {args.long_steps}-step jobs + {args.short_jobs} "
        f"1-image DDIM 10-step jobs every {args.short_every:g} s"
    )
    return [
        f"| (2) mixed load ({load}): p50 short-job completion vs alone | alone {alone * 1e3:.0f} ms "
        f"| engine {p50_e * 1e3:.0f} ms (static: {p50_s * 1e3:.0f} ms) | {p50_e / alone:.2f}x alone | <= 1.5x |",
        f"| (2) same load: total images/s, engine vs static batching | {images / span_static:.2f} img/s "
        f"| {images / span_engine:.2f} img/s | {span_static / span_engine:.2f}x | >= 1.0x |",
        f"| (2) spans of each run (s), engine / static | {' '.join(f'{s:.1f}' for s, _ in runs['static'])} "
        f"| {' '.join(f'{s:.1f}' for s, _ in runs['engine'])} | best of {args.repeats} | - |",
        f"| (2) engine steps in its best run, by sampler mix (mean step time) | static batching: at most "
        f"{static_calls} network calls, {span_static / static_calls * 1e3:.2f} ms each or more "
        f"| {len(best)} steps: {per_kind} | - | - |",
    ]


class FlatCostNetwork(torch.nn.Module):
    """A network that costs `seconds` per call whatever its rows and returns zeros: a GPU below
    saturation, where a step costs about the same from 1 to hundreds of rows, on any machine."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        time.sleep(self.seconds)
        return torch.zeros_like(x)


def flat_mixed_load(args, step_seconds: float = 0.009) -> list[str]:
    """(2) with the demo model's network replaced by a flat 9 ms one (the H200's fp32 eager step
    at 16 rows): whether the scheduler merges the short jobs into the long job's steps where rows
    cost nothing, and what a step costs the engine beyond the network, against static batching."""
    model = load_model(ROOT / "models" / "mnist", "cpu")
    model.network = FlatCostNetwork(step_seconds)
    model.invariant_rows = 0  # whole batches, a GPU's default: one call a step
    flat = argparse.Namespace(**{**vars(args), "long_steps": min(args.long_steps, 300), "short_every": 0.25,
                                 "max_batch": 256})  # fmt: skip
    return [r.replace("| (2)", "| (2, flat 9 ms network)") for r in mixed_load(model, flat)]


# --- (6) host time ---------------------------------------------------------------------------------
def host_time(request_counts=(16, 64, 256)) -> list[str]:
    """The engine's bookkeeping alone: 8x8 images, a network that returns zeros, requests of 16
    rows at DDIM 50 under a flat step-time table (a GPU below saturation: everything merges),
    median of 20 steps. On a GPU a step costs max(this, the device's work), so this must stay
    well under the network's step (16.5 ms for the demo model at 4,096 rows on an H200)."""
    from undiffuse import DiffusionModel, ModelConfig, ScheduleConfig, UNet, UNetConfig

    cfg = UNetConfig(image_size=8, base_channels=16, channel_mult=(1, 2), attention_resolutions=(), num_classes=10)
    model = DiffusionModel.from_config(UNet(cfg), ModelConfig(cfg, ScheduleConfig())).eval()
    cells = []
    for count in request_counts:
        engine = DenoisingEngine(model, EngineConfig(max_batch=16 * count, compile=False, channels_last=False))
        engine.network = lambda x, t, y: torch.zeros_like(x)
        engine.step_time = {b: 1e-3 for b in engine.buckets}
        for k in range(count):
            engine.add(Request(k, f"o{k % 4}", seed=k, start=0, count=16, steps=50, labels=[k % 10] * 16))
        engine.step()
        times = []
        for _ in range(20):
            started = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - started)
        cells.append(f"{count} requests ({16 * count} rows): {statistics.median(times) * 1e3:.2f} ms")
    return [f"| (6) host time of an engine step (null network, 8x8 images) | - | {'; '.join(cells)} | - | - |"]


# --- (7) guided packing -------------------------------------------------------------------------------
def guided_packing(model, shards: int = 16, shard_size: int = 16, max_batch: int = 64) -> list[str]:
    """Network calls for a burst of guided shards (guidance 3, the demo model's interval) with a
    network that costs nothing, under a flat step-time table (a GPU below saturation: only
    max_batch limits merging): the engine, which counts a shard's null-class twins at the steps
    where they run, against the same engine pricing them at every step (as it did before). On
    such a GPU a step costs about the same whatever its rows, so fewer calls is less time."""
    from undiffuse.scheduler import Slot

    class TwinsAtEveryStep(Slot):  # the reference: twice its images whenever it is guided
        __slots__ = ()

        @property
        def rows(self) -> int:
            return self.request.count * (2 if self.twin_at else 1)

    cells = {}
    for label, slot_class in (("every step", TwinsAtEveryStep), ("where they run", Slot)):
        for sampler, steps in (("ddim", 20), ("dpmpp_2m", 10), ("ddim", 50)):
            engine = DenoisingEngine(model, EngineConfig(max_batch=max_batch, compile=False, channels_last=False))
            calls: list[int] = []
            engine.network = lambda x, t, y, calls=calls: calls.append(x.shape[0]) or torch.zeros_like(x)
            engine.step_time = {b: 1e-3 for b in engine.buckets}
            for k in range(shards):
                engine.add(Request(k, f"o{k % 4}", seed=k, start=0, count=shard_size, steps=steps, sampler=sampler,
                                   labels=[k % 10] * shard_size, guidance_scale=3.0))  # fmt: skip
                engine.scheduler.get(k).__class__ = slot_class
            while not engine.idle:
                engine.step()
            cells[label, sampler, steps] = (len(calls), sum(calls) / len(calls))
    rows = []
    for sampler, steps in (("ddim", 20), ("dpmpp_2m", 10), ("ddim", 50)):
        (ref, ref_rows), (new, new_rows) = cells["every step", sampler, steps], cells["where they run", sampler, steps]
        rows.append(
            f"| (7) guided packing: {shards} shards of {shard_size}, guidance 3, {sampler} {steps}, max_batch "
            f"{max_batch}: network calls (mean rows per call) | twins priced at every step: {ref} ({ref_rows:.1f}) "
            f"| twins priced where they run: {new} ({new_rows:.1f}) | {ref / new:.2f}x fewer calls | - |"
        )
    return rows


GPU_ROWS = ("3", "4", "5", "2", "2c", "3b")  # the GPU section's rows, in their default order
MIXED_COMPILED = {
    "precision": "bf16",
    "compile": True,
    "buckets": (16, 32),
}  # row (2c): the long job and a short one fit 32


# --- GPU section --------------------------------------------------------------------------------
def demo_gpu(model, images: int, steps: int, max_batch: int, all_buckets: bool = False) -> list[str]:
    """The demo model at one large batch: fp32 eager, bf16 eager, bf16 + compile launching each
    op, and bf16 + compile with step graphs (the default on CUDA: each step one CUDA graph). A
    compiled engine warms its one bucket (max_batch) here; with all_buckets, every power-of-two
    bucket up to max_batch, as a Denoiser replica does at start (each bucket's compile time is
    logged)."""
    rows = []
    base = None
    one = (max_batch,)
    for label, cfg in (
        ("fp32 eager", EngineConfig(max_batch=max_batch, precision="fp32", compile=False)),
        ("bf16 eager", EngineConfig(max_batch=max_batch, precision="bf16", compile=False)),
        ("bf16 + compile", EngineConfig(max_batch=max_batch, precision="bf16", compile=True,
                                        buckets=None if all_buckets else one, step_graphs=False)),
        ("bf16 + compile + step graphs", EngineConfig(max_batch=max_batch, precision="bf16", compile=True,
                                                      buckets=None if all_buckets else one, step_graphs=True)),
    ):  # fmt: skip
        engine = DenoisingEngine(model, cfg)
        started = time.perf_counter()
        engine.warm_up(300, log=lambda m, label=label: print(f"  warm-up ({label}): {m}", flush=True))
        warm = time.perf_counter() - started
        t = min(run_engine(engine, digits(images, steps)) for _ in range(2))
        base = base or t
        rows.append(
            f"| (3) demo model DDIM {steps}, {images} images, engine {label} (max_batch {max_batch}, "
            f"{len(engine.buckets)} bucket(s) warmed in {warm:.0f} s) | - | {images / t:,.0f} img/s "
            f"| {base / t:.2f}x vs fp32 | >= 4,000 img/s |"
        )
        print(rows[-1], flush=True)
    return rows


def small_batch_gpu(model, images: int, steps: int) -> list[str]:
    """A small batch (launch-bound): bf16 + compile launching each op, with torch.compile's CUDA
    graphs of the network (reduce-overhead), and with the engine's step graphs (the whole step)."""
    rows = []
    base = None
    for label, cfg in (
        ("fp32 eager", EngineConfig(max_batch=images, precision="fp32", compile=False)),
        ("bf16 + compile", EngineConfig(max_batch=images, precision="bf16", compile=True, buckets=(images,),
                                        step_graphs=False)),
        ("bf16 + compile reduce-overhead (CUDA graphs)",
         EngineConfig(max_batch=images, precision="bf16", compile=True, buckets=(images,),
                      compile_mode="reduce-overhead", step_graphs=False)),
        ("bf16 + compile + step graphs (one CUDA graph per step)",
         EngineConfig(max_batch=images, precision="bf16", compile=True, buckets=(images,), step_graphs=True)),
    ):  # fmt: skip
        try:
            engine = DenoisingEngine(model, cfg)
            engine.warm_up(120)
            t = min(run_engine(engine, digits(images, steps)) for _ in range(3))
        except Exception as e:  # report, don't hide: a mode that fails is a finding
            rows.append(f"| (3b) demo model DDIM {steps}, batch {images}, {label} | - | failed: {e!r:.200} | - | - |")
            print(rows[-1], flush=True)
            continue
        base = base or t
        rows.append(
            f"| (3b) demo model DDIM {steps}, batch {images}, engine {label} | - | {images / t:,.0f} img/s "
            f"({t / steps * 1e3:.2f} ms per step) | {base / t:.2f}x vs fp32 | - |"
        )
        print(rows[-1], flush=True)
    return rows


def cifar_unet(device: torch.device, smoke: bool):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    if smoke:
        return UNet2DModel(sample_size=32, block_out_channels=(32, 64), layers_per_block=1,
                           down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8).to(device).eval()  # fmt: skip
    # google/ddpm-cifar10-32's architecture (35.7 M parameters), random weights: speed only
    return (
        UNet2DModel(
            sample_size=32,
            block_out_channels=(128, 256, 256, 256),
            layers_per_block=2,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
        .to(device)
        .eval()
    )


def cifar_gpu(device: torch.device, batch: int, steps: int, smoke: bool) -> list[str]:
    from diffusers import DDIMPipeline, DDIMScheduler
    from torch.utils.flop_counter import FlopCounterMode

    from undiffuse.checkpoint import DiffusionModel, _DiffusersUNet
    from undiffuse.schedule import NoiseSchedule

    unet = cifar_unet(device, smoke)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(torch.randn(1, 3, 32, 32, device=device), torch.tensor([500], device=device))
    gflop = counter.get_total_flops() / 1e9
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def diffusers_run() -> float:
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            pipe(
                batch_size=batch,
                num_inference_steps=steps,
                output_type="np",
                generator=torch.Generator(device).manual_seed(0),
            )
        sync()
        return time.perf_counter() - start

    diffusers_run()
    t_ref = min(diffusers_run() for _ in range(2))
    model = DiffusionModel(_DiffusersUNet(unet), NoiseSchedule.linear(), image_size=32, channels=3, num_classes=None)
    engine = DenoisingEngine(
        model, EngineConfig(max_batch=batch, precision="bf16", compile=not smoke, buckets=(batch,))
    )
    started = time.perf_counter()
    engine.warm_up(300)
    print(f"  CIFAR engine warm-up {time.perf_counter() - started:.0f} s", flush=True)
    reqs = [Request(("c", k), "bench", seed=0, start=16 * k, count=16, steps=steps) for k in range(batch // 16)]
    run_engine(engine, reqs)
    t = min(run_engine(engine, reqs) for _ in range(2))
    tflops = batch * steps * gflop / t / 1e3
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    frac = f", {tflops / peak:.0%} of bf16 peak" if peak else ""
    rows = [
        f"| (4) CIFAR-10 UNet ({params:.1f} M params, {gflop:.1f} GFLOP/img/step) DDIM {steps}, batch {batch}: "
        f"engine bf16+compile vs diffusers DDIMPipeline fp32 | {batch / t_ref:,.0f} img/s | {batch / t:,.0f} img/s "
        f"({tflops:.0f} TFLOP/s{frac}) | {t_ref / t:.2f}x | >= 1,200 img/s, >= 6x |"
    ]
    print(rows[-1], flush=True)
    return rows


# --- (8), (9) models people bring: a 256x256 pixel UNet, DiT-XL/2 with its VAE ----------------------
# google/ddpm-church-256's UNet2DModel (the ddpm-*-256 family: 113.7 M parameters, attention at 16x16)
UNET_256 = dict(
    sample_size=256,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    downsample_padding=0,
    flip_sin_to_cos=False,
    freq_shift=1,
    norm_eps=1e-6,
)
# tiny: the same six levels at an eighth of the channels and 64 px (attention at 4x4, 1/16 of the side)
UNET_256_TINY = {**UNET_256, "sample_size": 64, "block_out_channels": (16, 16, 32, 32, 64, 64), "norm_num_groups": 8}
# facebook/DiT-XL-2-256's DiTTransformer2DModel: 28 blocks of 16 heads x 72 = 1152, patch 2, 4 x 32 x 32
# latents, ImageNet's 1000 classes, learned variances (8 output channels)
DIT_XL_2 = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                sample_size=32, patch_size=2, num_embeds_ada_norm=1000)  # fmt: skip
DIT_TINY = {**DIT_XL_2, "num_attention_heads": 4, "attention_head_dim": 64, "num_layers": 6, "sample_size": 8}
# Stable Diffusion's AutoencoderKL (what DiT-XL-2-256 decodes with): 8x down, 4 latent channels
SD_VAE = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
              block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=256,
              scaling_factor=0.18215)  # fmt: skip
# tiny: 8 x 8 latents to 64 px; the decode 8 % of the denoising work at 20 steps (5 % at real size, 25 steps)
SD_VAE_TINY = {**SD_VAE, "block_out_channels": (16, 32, 64, 64), "layers_per_block": 1, "sample_size": 64,
               "norm_num_groups": 8}  # fmt: skip
# images and steps per row: tiny fits a 2-core CPU in about a minute a row, real one GPU in about one
MODEL_RUNS = {"tiny": (8, 20), "real": (32, 25)}
DIT_GUIDANCE = 4.0  # DiTPipeline's default: every step runs each image and its null-class twin


def _build(cls_name: str, config: dict, device: torch.device | str):
    """A diffusers model of config with random weights, made on device (no copy from the host)."""
    import diffusers

    torch.manual_seed(0)
    with torch.device(device):
        return getattr(diffusers, cls_name)(**config).eval()


def _gflop(call) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops() / 1e9


def unet_256(size: str, device: torch.device | str):
    return _build("UNet2DModel", UNET_256 if size == "real" else UNET_256_TINY, device)


def dit_xl_2(size: str, device: torch.device | str):
    """(transformer, vae)."""
    return (
        _build("DiTTransformer2DModel", DIT_XL_2 if size == "real" else DIT_TINY, device),
        _build("AutoencoderKL", SD_VAE if size == "real" else SD_VAE_TINY, device),
    )


def pixel_model(unet):
    """The UNet as undiffuse serves a ddpm-*-256 folder: linear schedule, x0 clipped (the default)."""
    from undiffuse.checkpoint import DiffusionModel, _DiffusersUNet
    from undiffuse.schedule import NoiseSchedule

    size = unet.config.sample_size
    return DiffusionModel(_DiffusersUNet(unet), NoiseSchedule.linear(), image_size=size, channels=3, num_classes=None)


def latent_model(transformer, vae):
    """DiT and its VAE as undiffuse serves a DiTPipeline folder: learned-variance channels dropped,
    x0 not clipped (DiT-XL-2-256's DDIM scheduler), decoded by `vae.decode(latents / scaling_factor)`."""
    from undiffuse.checkpoint import DiffusionModel
    from undiffuse.latent import DiTDenoiser, LatentDecoder
    from undiffuse.schedule import NoiseSchedule

    cfg = transformer.config
    return DiffusionModel(
        DiTDenoiser(
            transformer, cfg.num_embeds_ada_norm, cfg.in_channels, learned_sigma=cfg.out_channels > cfg.in_channels
        ),
        NoiseSchedule.linear(),
        image_size=vae.config.sample_size,
        channels=3,
        num_classes=cfg.num_embeds_ada_norm,
        clip_sample=False,
        decoder=LatentDecoder(vae, float(vae.config.scaling_factor)),
        latent_shape=(cfg.in_channels, cfg.sample_size, cfg.sample_size),
    )


def model_costs(size: str) -> dict[str, float]:
    """Parameters (M) and GFLOP per image of each network call, counted on the meta device
    (shapes only: nothing is allocated or run, so the real sizes cost a second on any host)."""
    meta = torch.device("meta")
    unet = unet_256(size, meta)
    transformer, vae = dit_xl_2(size, meta)
    px, lat = unet.config.sample_size, transformer.config.sample_size
    t, y = torch.tensor([500], device=meta), torch.tensor([1], device=meta)
    return {
        "unet_params": sum(p.numel() for p in unet.parameters()) / 1e6,
        "unet_gflop": _gflop(lambda: unet(torch.randn(1, 3, px, px, device=meta), t)),
        "dit_params": sum(p.numel() for p in transformer.parameters()) / 1e6,
        "dit_gflop": _gflop(lambda: transformer(torch.randn(1, 4, lat, lat, device=meta), timestep=t, class_labels=y)),
        "decoder_params": sum(p.numel() for m in (vae.post_quant_conv, vae.decoder) for p in m.parameters()) / 1e6,
        "decode_gflop": _gflop(lambda: vae.decode(torch.randn(1, 4, lat, lat, device=meta))),
    }


def _engine_configs(device: torch.device, rows: int, compile_models: bool) -> list[tuple[str, EngineConfig]]:
    """fp32 eager (the reference's precision: the ratio is the engine's own); on a GPU also bf16
    eager and, when asked, bf16 + compile (compiling a 256 px decoder for each of its buckets takes
    minutes cold, so it is not in the default run)."""
    one = (rows,)
    configs = [("fp32", EngineConfig(max_batch=rows, precision="fp32", compile=False, buckets=one))]
    if device.type == "cuda":
        configs.append(("bf16", EngineConfig(max_batch=rows, precision="bf16", compile=False, buckets=one)))
        if compile_models:
            configs.append(
                ("bf16 + compile", EngineConfig(max_batch=rows, precision="bf16", compile=True, buckets=one))
            )
    return configs


def _timed(run) -> float:
    sync()
    start = time.perf_counter()
    with torch.no_grad():
        run()
    sync()
    return time.perf_counter() - start


def _side_by_side(reference, engine_model, requests, rows, device, compile_models) -> list[tuple[str, float, float]]:
    """(engine config, reference seconds, engine seconds) for each engine config, best of 2 each
    after a 2-step warm-up: the reference is timed alternately with the first config (fp32) and
    that time stands for the others (a real-size fp32 reference run costs seconds on a GPU).
    Each engine starts with the device's cache emptied, so that a decoder sized by free memory
    is not sized smaller for the blocks an earlier config or the reference left cached."""
    _timed(lambda: reference(2))
    out: list[tuple[str, float, float]] = []
    for label, cfg in _engine_configs(device, rows, compile_models):
        gc.collect()  # an earlier engine's compiled graphs may sit in reference cycles
        _free(device)
        engine = DenoisingEngine(engine_model, cfg)
        engine.warm_up(300)
        run_engine(engine, [Request(**{**r.__dict__, "id": ("warm", r.id), "steps": 2}) for r in requests])
        t_ref, t_engine = [], []
        for _ in range(2):
            if not out:
                t_ref.append(_timed(lambda: reference(None)))
            t_engine.append(run_engine(engine, requests))
        out.append((label, min(t_ref) if t_ref else out[0][1], min(t_engine)))
        del engine
    return out


def _model_rows(name, what, images, steps, reference, gflop_per_image, timings) -> list[str]:
    """One row per engine config; the engine's FLOP/s count its network calls and its decode."""
    rows = []
    for label, t_ref, t_engine in timings:
        rate = images * gflop_per_image / t_engine
        rate_text = f"{rate / 1e3:.1f} TFLOP/s" if rate >= 1e3 else f"{rate:.1f} GFLOP/s"
        rows.append(
            f"| {name} ({what}) DDIM {steps}, {images} images, decoded to pixels: engine {label} vs {reference} "
            f"| {images / t_ref:,.2f} img/s | {images / t_engine:,.2f} img/s ({rate_text}) "
            f"| {t_ref / t_engine:.2f}x | - |"
        )
        print(rows[-1], flush=True)
    return rows


def models_people_bring(device: torch.device, size: str, images: int, steps: int, compile_models: bool) -> list[str]:
    """(8) a ddpm-*-256 UNet through the engine against diffusers' DDIMPipeline, (9) DiT-XL/2 with
    guidance 4 and Stable Diffusion's VAE decoder against DiTPipeline: random weights, the same
    weights and steps on both sides, both ending in host pixels (the reference's float array,
    the engine's uint8). The engine gets its own copy of the weights, so its channels_last layout
    does not change the reference's."""
    import copy

    from diffusers import DDIMPipeline, DDIMScheduler, DiTPipeline

    costs = model_costs(size)
    shards = [(start, min(16, images - start)) for start in range(0, images, 16)]
    rows = []

    # (8) pixel space: 256 x 256 (real) / 64 x 64 (tiny), no classes, DDIM with x0 clipped (as DDIMPipeline)
    unet = unet_256(size, device)
    px = unet.config.sample_size
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)

    def ddim(n_steps):
        generator = torch.Generator(device).manual_seed(0)
        pipe(batch_size=images, num_inference_steps=n_steps or steps, output_type="np", generator=generator)

    model = pixel_model(copy.deepcopy(unet))
    requests = [Request(("u", k), "bench", seed=0, start=s, count=n, steps=steps) for k, (s, n) in enumerate(shards)]
    timings = _side_by_side(ddim, model, requests, images, device, compile_models)
    gflop = steps * costs["unet_gflop"]
    rows += _model_rows(
        f"(8) {px}x{px} pixel UNet",
        f"ddpm-*-256 architecture{'' if size == 'real' else ', tiny'}: {costs['unet_params']:.1f} M params, "
        f"{costs['unet_gflop']:.3g} GFLOP/img/step",
        images, steps, "diffusers DDIMPipeline fp32", gflop, timings,
    )  # fmt: skip
    del pipe, model, unet
    _free(device)

    # (9) latent: DiT-XL/2 on 4 x 32 x 32 latents (real) / 4 x 8 x 8 (tiny), decoded by the VAE
    transformer, vae = dit_xl_2(size, device)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    labels = [(37 * i) % 1000 for i in range(images)]

    def dit(n_steps):
        generator = torch.Generator(device).manual_seed(0)
        pipe(labels, guidance_scale=DIT_GUIDANCE, num_inference_steps=n_steps or steps, generator=generator,
             output_type="np")  # fmt: skip

    model = latent_model(copy.deepcopy(transformer), copy.deepcopy(vae))
    requests = [
        Request(("d", k), "bench", seed=0, start=s, count=n, steps=steps, labels=labels[s : s + n],
                guidance_scale=DIT_GUIDANCE)
        for k, (s, n) in enumerate(shards)
    ]  # fmt: skip
    timings = _side_by_side(dit, model, requests, 2 * images, device, compile_models)
    gflop = 2 * steps * costs["dit_gflop"] + costs["decode_gflop"]
    out = vae.config.sample_size
    rows += _model_rows(
        f"(9) DiT-XL/2 + VAE decoder, {out}x{out}",
        f"{'' if size == 'real' else 'tiny, '}{costs['dit_params']:.1f} M + {costs['decoder_params']:.1f} M decoder "
        f"params, {costs['dit_gflop']:.3g} GFLOP/img/call (2 calls a step: guidance {DIT_GUIDANCE:g}), decode "
        f"{costs['decode_gflop']:.3g} GFLOP/img",
        images, steps, "diffusers DiTPipeline fp32", gflop, timings,
    )  # fmt: skip
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def knn_accuracy(pixels: torch.Tensor, wanted: torch.Tensor) -> float | None:
    """Share of images that 5-NN on the shared MNIST test set (raw pixels) puts in the wanted
    class; None where the data is not beside the checkout."""
    mnist = Path(os.environ.get("UNDIFFUSE_MNIST", ROOT.parent / "shared" / "datasets" / "mnist"))
    if not mnist.is_dir():
        return None
    from undiffuse.data import load_idx_dataset

    images, labels = load_idx_dataset(mnist / "t10k-images-idx3-ubyte.gz", mnist / "t10k-labels-idx1-ubyte.gz")
    queries = pixels.float().permute(0, 3, 1, 2) / 127.5 - 1
    votes = labels[torch.cdist(queries.flatten(1), images.flatten(1)).topk(5, largest=False).indices]
    return (votes.mode(dim=1).values == wanted).float().mean().item()


def precision_check(model, steps: int, images: int = 100) -> list[str]:
    """The same digits in fp32 and bf16: largest pixel difference and class accuracy of each."""
    reqs = digits(images, steps)
    out = {}
    for precision in ("fp32", "bf16"):
        engine = DenoisingEngine(model, EngineConfig(max_batch=256, precision=precision, compile=False))
        for r in reqs:
            engine.add(r)
        done = []
        while not engine.idle:
            done += engine.step()
        out[precision] = torch.cat([torch.from_numpy(f.pixels()) for f in sorted(done, key=lambda f: f.id)])
    diff = (out["fp32"].int() - out["bf16"].int()).abs().float()
    wanted = torch.tensor([c for r in reqs for c in r.labels])
    acc = {k: knn_accuracy(v, wanted) for k, v in out.items()}
    accuracy = "" if acc["fp32"] is None else f"; 5-NN class accuracy fp32 {acc['fp32']:.2f}, bf16 {acc['bf16']:.2f}"
    device = next(model.parameters()).device.type
    return [
        f"| (5) bf16 vs fp32 on {device}, the same {images} digits, DDIM {steps}: pixel difference (0-255 levels) "
        f"| - | mean {diff.mean():.2f}, {(diff <= 8).float().mean():.1%} within 8, worst image mean "
        f"{diff.flatten(1).mean(1).max():.2f}, largest {int(diff.max())}{accuracy} | - | accuracy unchanged |"
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", help="also run the GPU section")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: check the code paths, not the speed")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--long-jobs", type=int, default=1)
    p.add_argument("--long-images", type=int, default=16)
    p.add_argument("--long-steps", type=int, default=1000)
    p.add_argument("--short-jobs", type=int, default=8)
    p.add_argument("--short-every", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2, help="mixed load: runs of each, alternating")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument(
        "--gpu-rows", nargs="+", choices=GPU_ROWS, default=list(GPU_ROWS), help="GPU rows to run, in this order"
    )
    p.add_argument("--all-buckets", action="store_true", help="GPU (3): warm every bucket, as a replica does")
    p.add_argument(
        "--size", choices=("tiny", "real"), help="(8), (9): model sizes (default: tiny on the CPU, real on a GPU)"
    )
    p.add_argument("--model-images", type=int, help="(8), (9): images per run (default: by size, MODEL_RUNS)")
    p.add_argument("--model-steps", type=int, help="(8), (9): DDIM steps (default: by size, MODEL_RUNS)")
    p.add_argument("--compile-models", action="store_true", help="(8), (9) on a GPU: also bf16 + compile")
    p.add_argument("--skip-models", action="store_true", help="leave out (8) and (9)")
    p.add_argument("--models-only", action="store_true", help="only (8) and (9), in the sections asked for")
    args = p.parse_args()
    if args.smoke:
        args.images, args.steps, args.long_steps, args.short_jobs, args.short_every = 16, 3, 30, 3, 0.2

    device = torch.device("cuda" if args.gpu and torch.cuda.is_available() else "cpu")
    machine = (
        torch.cuda.get_device_name()
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'}, {torch.get_num_threads()} threads"
    )
    rows = []
    if not args.skip_cpu and not args.models_only:
        cpu_model = load_model(ROOT / "models" / "mnist", "cpu")
        rows += throughput(cpu_model, args.images, args.steps, args.max_batch)
        rows += mixed_load(cpu_model, args)
        rows += flat_mixed_load(args)
        rows += precision_check(cpu_model, 3 if args.smoke else 50, 20 if args.smoke else 100)
        rows += host_time()
        rows += guided_packing(cpu_model)
    if args.gpu and not args.models_only:
        model = load_model(ROOT / "models" / "mnist", device)
        big = 256 if args.smoke else 4096
        for row in args.gpu_rows:
            if row == "3":
                rows += demo_gpu(model, big, 3 if args.smoke else 50, big, args.all_buckets)
            elif row == "3b":
                rows += small_batch_gpu(model, 16 if args.smoke else 64, 3 if args.smoke else 50)
            elif row == "4":
                rows += cifar_gpu(device, 32 if args.smoke else 256, 2 if args.smoke else 20, args.smoke)
            elif row == "5":
                rows += precision_check(model, 3 if args.smoke else 50, 20 if args.smoke else 100)
                print(rows[-1], flush=True)
            elif row == "2":
                gpu_load = argparse.Namespace(**{**vars(args), "short_every": 0.1 if args.smoke else 0.25,
                                                 "max_batch": 256})  # fmt: skip
                rows += [r.replace("| (2)", "| (2, GPU)") for r in mixed_load(model, gpu_load)]
                print("\n".join(rows[-4:]), flush=True)
            elif row == "2c":  # the service's GPU settings, static batching in the same kind of engine
                gpu_load = argparse.Namespace(**{**vars(args), "short_every": 0.1 if args.smoke else 0.25,
                                                 "max_batch": 256})  # fmt: skip
                found = mixed_load(model, gpu_load, MIXED_COMPILED)
                rows += [r.replace("| (2)", "| (2c, GPU, bf16 + compile + step graphs)") for r in found]
                print("\n".join(rows[-4:]), flush=True)
    sections = [(torch.device("cpu"), "")] * (not args.skip_cpu) + [(device, ", GPU")] * args.gpu
    for where, tag in sections if not args.skip_models else ():
        size = args.size or ("real" if where.type == "cuda" and not args.smoke else "tiny")
        images, steps = (2, 2) if args.smoke else MODEL_RUNS[size]
        found = models_people_bring(where, size, args.model_images or images, args.model_steps or steps,
                                    args.compile_models)  # fmt: skip
        rows += [r.replace("| (8)", f"| (8{tag})").replace("| (9)", f"| (9{tag})") for r in found]
    print(f"\nundiffuse engine benchmark — torch {torch.__version__}, {machine}\n")
    print("| measurement | reference | undiffuse | ratio | goal |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
