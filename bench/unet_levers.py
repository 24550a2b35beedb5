"""What each lever gives the CIFAR-10-sized UNet's network call, one lever added per row.

    python bench/unet_levers.py                         # CUDA (on a CPU: --smoke)
    python bench/unet_levers.py --batch 256 512 --autotune
    python bench/unet_levers.py --smoke                 # a tiny UNet, any device: the code paths

The network alone (diffusers' UNet2DModel with google/ddpm-cifar10-32's architecture, 35.7 M
parameters, random weights), one call at a fixed batch and timestep, timed with CUDA events over
`--calls` calls after three warm-up calls (compiling rows: after compiling). Levers, cumulative:

  fp32 eager -> + TF32 matmuls and convolutions -> bf16 autocast -> + channels_last (what the
  engine runs eager) -> + cudnn.benchmark -> + torch.compile (default mode: the engine's fast
  path) -> + Inductor freezing (weights become constants: the autocast casts and conv/bias folds
  happen once) -> bf16 weights instead of autocast -> the same in NCHW (is channels_last worth it
  once compiled? eager bf16 ran 0.82-0.85x with it on an H200) -> the best at each larger `--batch`
  [-> + max-autotune-no-cudagraphs, with --autotune: minutes of compiling]

For each row: ms per call, images/s of DDIM 20 at that call time (the network's ceiling: the
engine's own work per step comes on top), TFLOP/s (FlopCounterMode's count on one image) and
the fraction of the card's dense bf16 peak, and the speed-up over the row it changes (the row
before, or for the NCHW and batch rows the bf16-weights row) and over fp32 eager.
Rows that fail are reported as failed. `--max-seconds` stops before a row that would start
after it (compiling rows take 20-60 s each on a Hopper GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from engine import BF16_PEAK_TFLOPS, cifar_unet  # noqa: E402  (bench/engine.py: the UNet of its row (4))

DDIM_STEPS = 20


class Lever:
    """One row's settings: the row it derives from (`parent`) with one thing changed."""

    def __init__(self, name: str, parent: Lever | None = None, **settings) -> None:
        self.name = name
        self.parent = parent
        self.s = settings

    def then(self, name: str, **changes) -> Lever:
        return Lever(name, self, **{**self.s, **changes})


def levers(batches: list[int], autotune: bool) -> list[Lever]:
    base = Lever("fp32 eager", batch=batches[0], tf32=False, autocast=False, bf16_weights=False,
                 channels_last=False, cudnn_benchmark=False, compile=None, freezing=False)  # fmt: skip
    rows = [base]
    rows.append(rows[-1].then("+ TF32", tf32=True))
    rows.append(rows[-1].then("bf16 autocast", autocast=True))
    rows.append(rows[-1].then("+ channels_last (the engine, eager)", channels_last=True))
    rows.append(rows[-1].then("+ cudnn.benchmark", cudnn_benchmark=True))
    rows.append(rows[-1].then("+ torch.compile default (the engine's fast path)", compile="default"))
    rows.append(rows[-1].then("+ Inductor freezing", freezing=True))
    rows.append(rows[-1].then("bf16 weights instead of autocast", autocast=False, bf16_weights=True))
    best = rows[-1]
    rows.append(best.then("the same in NCHW (channels_last off)", channels_last=False))
    rows += [best.then(f"the same at batch {b}", batch=b) for b in batches[1:]]
    if autotune:
        rows.append(best.then("+ max-autotune-no-cudagraphs", compile="max-autotune-no-cudagraphs"))
    return rows


def build_call(unet, lever: Lever, device: torch.device):
    """A no-argument call of the network as the lever sets it up, on a fixed batch."""
    s = lever.s
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = s["tf32"]
    torch.backends.cudnn.benchmark = s["cudnn_benchmark"]
    net = copy.deepcopy(unet).to(device)
    dtype = torch.bfloat16 if s["bf16_weights"] else torch.float32
    net = net.to(dtype=dtype)
    fmt = torch.channels_last if s["channels_last"] else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(s["batch"], 3, unet.config.sample_size, unet.config.sample_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=fmt)
    t = torch.full((s["batch"],), 500, device=device)

    def forward(x, t):
        return net(x, t).sample

    torch._dynamo.reset()
    fn = torch.compile(forward, mode=s["compile"], dynamic=False) if s["compile"] else forward
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=s["autocast"])

    def call():
        with torch.no_grad(), autocast:
            return fn(x, t)

    return call


def timed(call, device: torch.device, calls: int, freezing: bool) -> float:
    """Seconds per call after warm-up (the first call compiles, under freezing if asked)."""
    patch = torch._inductor.config.patch(freezing=freezing) if freezing else contextlib.nullcontext()
    with patch:
        for _ in range(3):
            call()
    if device.type != "cuda":
        start = time.perf_counter()
        for _ in range(calls):
            call()
        return (time.perf_counter() - start) / calls
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    begin.record()
    for _ in range(calls):
        call()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / 1e3 / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, nargs="+", default=[256, 512])
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--autotune", action="store_true", help="also max-autotune-no-cudagraphs (minutes)")
    p.add_argument("--smoke", action="store_true", help="a tiny UNet at batch 8: the code paths, not speeds")
    p.add_argument("--max-seconds", type=float, default=240.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    if device.type != "cuda" and not args.smoke:
        p.error("the levers are a GPU measurement; on a CPU use --smoke")
    if args.smoke:
        args.batch, args.calls = [8, 16], 2
    unet = cifar_unet(torch.device("cpu"), args.smoke)
    params = sum(q.numel() for q in unet.parameters()) / 1e6
    # counted on the device, as bench/engine.py's row (4) counts (attention counts differently on a CPU)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        copy.deepcopy(unet).to(device)(torch.randn(1, 3, 32, 32, device=device), torch.tensor([500], device=device))
    gflop = counter.get_total_flops() / 1e9
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.processor() or 'cpu'} (CPU)"
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    lines, first, per_image_of = [], None, {}
    for lever in levers(args.batch, args.autotune):
        b = lever.s["batch"]
        if time.perf_counter() - started > args.max_seconds:
            lines.append(f"| {lever.name} | {b} | not run: --max-seconds {args.max_seconds:.0f} reached | | | | |")
            print(lines[-1], flush=True)
            continue
        try:
            t0 = time.perf_counter()
            call = build_call(unet, lever, device)
            sec = timed(call, device, args.calls, lever.s["freezing"])
            setup = time.perf_counter() - t0
        except Exception as e:  # a lever that fails is a finding, not a crash
            lines.append(f"| {lever.name} | {b} | failed: {e!r:.160} | | | | |")
            print(lines[-1], flush=True)
            continue
        per_image = sec / b
        first = first or per_image
        tflops = gflop * b / sec / 1e3
        frac = f" ({tflops / peak:.0%})" if peak else ""
        parent = per_image_of.get(lever.parent.name) if lever.parent else None
        step = f"{parent / per_image:.2f}x" if parent else "-"
        lines.append(
            f"| {lever.name} | {b} | {sec * 1e3:.2f} ms | {1 / (per_image * DDIM_STEPS):,.0f} | {tflops:.3g}{frac} "
            f"| {step} | {first / per_image:.2f}x |"
        )
        print(lines[-1], f"  [{setup:.0f} s to build, compile and time]", flush=True)
        per_image_of[lever.name] = per_image
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\nCIFAR-10 UNet levers — {params:.1f} M parameters, {gflop:.1f} GFLOP per image per call, "
          f"torch {torch.__version__}, {name}\n")  # fmt: skip
    print("| lever (cumulative) | batch | ms per call | DDIM 20 images/s (network only) | TFLOP/s (of bf16 peak) "
          "| vs the row it changes (per image) | vs fp32 eager (per image) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
