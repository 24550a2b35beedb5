"""Where an engine step's time goes on the device: kernels per step and the GPU's idle fraction.

    python bench/step_profile.py                      # CUDA if present, else the CPU
    python bench/step_profile.py --rows 64 4096 --steps 20

The demo model (models/mnist), DDIM 50, 16-row requests filling `rows` rows, the engine's default
fast path on CUDA (bf16, channels_last, torch.compile, one padded bucket) and optionally
`--compile-mode reduce-overhead` (CUDA graphs). After warm-up and the first step, `--steps` steady
steps (nothing joins or leaves) run twice:

- timed: wall time per step (synchronised once at the end, as the service runs them);
- under `torch.profiler`: the device's kernels and copies per step, and their summed duration
  (one stream: kernels do not overlap, so the sum is the time the GPU was busy).

idle fraction = 1 - busy / wall: the part of each step in which the GPU waits for the host (the
engine's Python, launches, the network's own launch overhead). On a CPU there are no device
kernels; the table then gives the aten ops per step and the host time only. The top kernels by
time are printed after the table.
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

SAMPLER_STEPS = 50


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def steady_engine(model, rows: int, config: EngineConfig) -> DenoisingEngine:
    """An engine holding `rows` rows in 16-row requests, warmed and past its first step."""
    engine = DenoisingEngine(model, config)
    engine.warm_up(300, decoder=False)
    for k, start in enumerate(range(0, rows, 16)):
        n = min(16, rows - start)
        engine.add(Request(("p", k), f"o{k % 4}", seed=0, start=start, count=n, steps=SAMPLER_STEPS, sampler="ddim",
                           labels=[(start + i) % 10 for i in range(n)]))  # fmt: skip
    for _ in range(3):  # assembly, then two steady steps
        engine.step()
    return engine


def measure(model, rows: int, steps: int, config: EngineConfig, device: torch.device) -> dict:
    engine = steady_engine(model, rows, config)
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    wall = (time.perf_counter() - start) / steps
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    events = prof.events()
    kernels = [e for e in events if e.device_type == DeviceType.CUDA]
    busy = sum(e.time_range.elapsed_us() for e in kernels) / 1e6 / steps
    aten = sum(1 for e in events if e.device_type == DeviceType.CPU and e.name.startswith("aten::"))
    top = sorted(
        ((a.key, a.self_device_time_total / steps) for a in prof.key_averages() if a.self_device_time_total > 0),
        key=lambda kv: -kv[1],
    )[:8]
    assert engine.scheduler.clock >= 3 + 2 * steps  # every step advanced (no request finished early)
    return {"wall": wall, "kernels": len(kernels) / steps, "busy": busy, "aten": aten / steps, "top": top}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[64, 4096])
    p.add_argument("--steps", type=int, default=20, help="steady steps timed, then profiled (< 47)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile-mode", nargs="+", default=["default", "reduce-overhead"])
    args = p.parse_args()
    if args.steps > SAMPLER_STEPS - 3 - args.steps:
        p.error(f"--steps {args.steps}: two runs of them must fit in DDIM {SAMPLER_STEPS} after 3 steps")
    device = torch.device(args.device)
    model = load_model(ROOT / "models" / "mnist", device)
    compiled = device.type == "cuda"
    modes = args.compile_mode if compiled else ["eager"]
    machine = torch.cuda.get_device_name() if compiled else f"{platform.processor() or 'cpu'} (CPU)"
    lines = []
    for rows in args.rows:
        for mode in modes:
            config = EngineConfig(max_batch=rows, compile=compiled, buckets=(rows,) if compiled else None,
                                  compile_mode=mode if compiled else "default")  # fmt: skip
            r = measure(model, rows, args.steps, config, device)
            idle = f"{1 - r['busy'] / r['wall']:.0%}" if compiled else "-"
            lines.append(
                f"| {rows:,} | {mode} | {r['wall'] * 1e3:.2f} ms | {r['busy'] * 1e3:.2f} ms | {idle} "
                f"| {r['kernels']:.0f} | {r['aten']:.0f} | {rows / (r['wall'] * SAMPLER_STEPS):,.0f} |"
            )
            print(lines[-1], flush=True)
            for name, us in r["top"]:
                print(f"    {us / 1e3:8.3f} ms  {name[:100]}", flush=True)
    print(f"\nundiffuse engine step profile — torch {torch.__version__}, {machine}, DDIM {SAMPLER_STEPS}, "
          f"{args.steps} steady steps\n")  # fmt: skip
    print("| rows | compile mode | wall per step | GPU busy per step | GPU idle | device kernels per step "
          "| aten ops per step | images/s at this step time |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
