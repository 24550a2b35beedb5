"""Where an engine step's time goes on the device: kernels per step and the GPU's idle fraction.

    python bench/step_profile.py                      # CUDA if present, else the CPU
    python bench/step_profile.py --rows 64 4096 --modes default reduce-overhead graphs
    python bench/step_profile.py --rows 16 --sampler ddpm --modes eager-fp32 --reference

The demo model (models/mnist), requests of 16 rows filling `rows` rows, `--sampler` at 200
steps (so that many steady steps fit; a step costs the same whatever the step count), the engine
in each of `--modes`:

- eager-fp32: fp32, nothing compiled (the mixed-load row of bench/engine.py);
- eager: the device's default precision (bf16 on CUDA), nothing compiled;
- default / reduce-overhead / graphs: the engine's fast path (bf16, channels_last, torch.compile,
  one padded bucket), launching every op, with torch.compile's CUDA graphs of the network, and
  with the engine's step graphs (the whole step one CUDA graph, the default on CUDA; CUDA only).

After warm-up and the first steps, steady steps (nothing joins or leaves) run:

- timed: `--steps` steps three times (one synchronisation at the end of each), the best kept:
  wall time per step, as the service runs them;
- under `torch.profiler`: `--steps` more: the device's kernels and copies per step and their
  summed duration (one stream: kernels do not overlap, so the sum is the time the GPU was busy),
  and the aten ops the host dispatched (the outermost: an op another op calls is not counted).

idle fraction = 1 - busy / wall: the part of each step in which the GPU waits for the host (the
engine's Python, launches, the network's own launch overhead). With `--reference`, the same for
`Sampler.sample`'s loop over the same images in fp32 eager (static batching's loop in the mixed
load), per step. On a CPU there are no device kernels; the table then gives the aten ops per step
and the time only. The device's top kernels by time per step are printed after each row.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from undiffuse import load_model  # noqa: E402
from undiffuse.engine import DenoisingEngine, EngineConfig, Request  # noqa: E402

SAMPLER_STEPS = 200
MODES = {  # mode -> EngineConfig settings
    "eager-fp32": dict(precision="fp32", compile=False),
    "eager": dict(compile=False),
    "default": dict(compile=True, compile_mode="default", step_graphs=False),
    "reduce-overhead": dict(compile=True, compile_mode="reduce-overhead", step_graphs=False),
    "graphs": dict(compile=True, step_graphs=True),  # the engine's step graphs: the default on CUDA
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def requests(rows: int, sampler: str) -> list[Request]:
    return [
        Request(("p", k), f"o{k % 4}", seed=0, start=start, count=min(16, rows - start), steps=SAMPLER_STEPS,
                sampler=sampler, labels=[(start + i) % 10 for i in range(min(16, rows - start))])
        for k, start in enumerate(range(0, rows, 16))
    ]  # fmt: skip


def profiled(step, steps: int, device: torch.device) -> dict:
    """Best wall time per step of three timed runs of `steps` calls, then one profiled run."""
    walls = []
    for _ in range(3):
        sync(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        walls.append((time.perf_counter() - start) / steps)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    # aten ops the host dispatched: the outermost only (conv2d, not the convolution it calls)
    aten = sum(
        1
        for e in events
        if e.device_type == DeviceType.CPU
        and e.name.startswith("aten::")
        and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )
    by_kernel: dict[str, float] = {}
    for e in kernels:
        by_kernel[e.name] = by_kernel.get(e.name, 0.0) + e.time_range.elapsed_us() / steps
    top = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:8]
    return {"wall": min(walls), "kernels": len(kernels) / steps, "busy": busy, "aten": aten / steps, "top": top}


def engine_steps(model, rows: int, sampler: str, config: EngineConfig):
    """A step function of an engine holding `rows` rows, warmed and past its first steps."""
    engine = DenoisingEngine(model, config)
    engine.warm_up(300, decoder=False)
    for r in requests(rows, sampler):
        engine.add(r)
    for _ in range(3):  # assembly, then two steady steps
        engine.step()

    def step():
        if engine.step():
            raise RuntimeError("a request finished during the steady steps: raise SAMPLER_STEPS")

    return step


def sampler_steps(model, rows: int, sampler_name: str, device: torch.device):
    """A step function that runs one iteration of Sampler.sample's loop (fp32 eager): its
    network call, noise draw and update, as `Sampler.sample` makes them."""
    from undiffuse import ImageNoise
    from undiffuse.samplers import COLUMNS, guided_eps

    sampler = model.make_sampler(sampler_name)
    noise = ImageNoise([0] * rows, range(rows), device)
    shape = model.sample_shape
    table = sampler.coefficient_table(SAMPLER_STEPS, torch.float32).to(device)
    labels = torch.tensor([i % 10 for i in range(rows)], device=device)
    state = {"x": noise.draw(0, shape).to(device), "i": 0}
    timesteps = sampler.timesteps(SAMPLER_STEPS)

    @torch.no_grad()
    def step():
        i = state["i"] % (SAMPLER_STEPS - 1)
        t_rows = torch.full((rows,), timesteps[i], device=device, dtype=torch.long)
        eps = guided_eps(model.eps, state["x"], t_rows, labels, 1.0)
        z = noise.draw(i + 1, shape).to(device) if sampler.needs_noise else None
        state["x"], _ = sampler.update(state["x"], eps, table[i].expand(rows, len(COLUMNS)),
                                       sampler.terms - {"history"}, thresholding=sampler.thresholding, noise=z)  # fmt: skip
        state["i"] += 1

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 4096])
    p.add_argument("--steps", type=int, default=20, help="steady steps per timed and profiled run")
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["default", "reduce-overhead", "graphs"])
    p.add_argument("--reference", action="store_true", help="also Sampler.sample's loop, fp32 eager")
    args = p.parse_args()
    if 3 + 4 * args.steps >= SAMPLER_STEPS:
        p.error(f"--steps {args.steps}: four runs of them must fit in {SAMPLER_STEPS} steps after 3")
    device = torch.device(args.device)
    model = load_model(ROOT / "models" / "mnist", device)
    cuda = device.type == "cuda"
    modes = [m for m in args.modes if cuda or not MODES[m].get("compile")] or ["eager-fp32"]
    machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or 'cpu'} (CPU)"
    lines = []
    for rows in args.rows:
        runs = [f"engine, {m}" for m in modes] + ["Sampler.sample loop, fp32 eager"] * args.reference
        for label in runs:
            if label.startswith("engine"):
                mode = MODES[label.removeprefix("engine, ")]
                config = EngineConfig(max_batch=rows, buckets=(rows,) if mode["compile"] else None, **mode)
                step = engine_steps(model, rows, args.sampler, config)
            else:
                step = sampler_steps(model, rows, args.sampler, device)
            r = profiled(step, args.steps, device)
            # wall and busy come from separate runs: a negative idle means the two differ by noise
            idle = f"{1 - r['busy'] / r['wall']:.0%}" if cuda else "-"
            lines.append(
                f"| {rows:,} | {label} | {r['wall'] * 1e3:.2f} ms | {r['busy'] * 1e3:.2f} ms | {idle} "
                f"| {r['kernels']:.0f} | {r['aten']:.0f} | {rows / (r['wall'] * 50):,.0f} |"
            )
            print(lines[-1], flush=True)
            for name, us in r["top"]:
                print(f"    {us / 1e3:8.3f} ms  {name[:100]}", flush=True)
    print(f"\nundiffuse engine step profile — torch {torch.__version__}, {machine}, {args.sampler}, "
          f"{args.steps} steady steps a run\n")  # fmt: skip
    print("| rows | what | wall per step | GPU busy per step | GPU idle | device kernels per step "
          "| aten ops per step | images/s of 50 steps at this step time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
