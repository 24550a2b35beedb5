"""What batch-invariant slicing costs (undiffuse.invariance): the network, and the engine, with
every call sliced to R rows against whole batches (R = 0, the reference), in one run.

    python bench/invariance.py                                     # CPU, the demo model
    python bench/invariance.py --device cuda --rows 0 32 64 128 256 --batches 1 64 512 4096

1. The network alone: milliseconds per batch of N rows (best of --repeats), sliced to R rows,
   and the ratio to whole batches. N = 1 is a lone image, whose call is padded to R rows.
2. The engine (DDIM 20, the demo model, guidance 1, eager at the device's default precision): images/s with --requests requests of 16
   images, all joining at once (a full engine), and the seconds a lone 1-image request takes on
   an idle engine; each as a ratio to whole batches.
3. Whether it holds: a 3-image request alone and beside the full load, bit for bit (the float
   samples); "differs" is what whole batches give.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from undiffuse import load_model  # noqa: E402
from undiffuse.engine import DenoisingEngine, EngineConfig, Request  # noqa: E402
from undiffuse.invariance import in_slices  # noqa: E402

STEPS = 20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def network_ms(model, n: int, rows: int, repeats: int, device: torch.device) -> float:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, *model.sample_shape, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, model.schedule.num_timesteps, (n,), generator=g).to(device)
    labels = torch.randint(0, model.num_classes or 1, (n,), generator=g).to(device) if model.num_classes else None
    best = float("inf")
    with torch.no_grad():
        for k in range(repeats + 1):
            sync(device)
            started = time.perf_counter()
            in_slices(model.network, x, t, labels, rows)
            sync(device)
            if k:  # the first call warms up
                best = min(best, time.perf_counter() - started)
    return best * 1e3


def engine_run(model, rows: int, requests: list[Request], max_batch: int) -> tuple[float, dict]:
    """Seconds from the first step to the last, and {id: float samples}."""
    engine = DenoisingEngine(
        model,
        EngineConfig(max_batch=max_batch, invariant_rows=rows, latency_slack=None, keep_samples=True, compile=False),
    )
    for r in requests:
        engine.add(r)
    done = {}
    sync(engine.device)
    started = time.perf_counter()
    while not engine.idle:
        done.update((f.id, f.samples) for f in engine.step())
    sync(engine.device)
    return time.perf_counter() - started, done


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "mnist")
    ap.add_argument("--rows", type=int, nargs="+", default=[0, 4, 8, 16, 32], help="slice sizes; 0 = whole batches")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 3, 16, 64, 256], help="network batch sizes N")
    ap.add_argument("--requests", type=int, default=8, help="16-image requests of the engine's full load")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if 0 not in args.rows:
        args.rows = [0, *args.rows]
    model = load_model(args.model, device)

    print(
        f"# batch invariance: {args.model.name}, {platform.processor() or platform.machine()}, torch {torch.__version__}"
    )
    print(
        f"# threads {torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )
    print(
        "\n| network, ms per batch (ratio to whole) | "
        + " | ".join(f"R = {r}" if r else "whole" for r in args.rows)
        + " |"
    )
    print("|---" * (len(args.rows) + 1) + "|")
    for n in args.batches:
        ms = {r: network_ms(model, n, r, args.repeats, device) for r in args.rows}
        cells = [f"{ms[0]:.1f}"] + [f"{ms[r]:.1f} ({ms[r] / ms[0]:.2f}×)" for r in args.rows if r]
        print(f"| N = {n} | " + " | ".join(cells) + " |")

    label = (lambda k: [k % model.num_classes] * 16) if model.num_classes else (lambda k: None)
    load = [
        Request(f"r{k}", f"o{k % 4}", seed=k, start=0, count=16, steps=STEPS, labels=label(k))
        for k in range(args.requests)
    ]
    probe = Request(
        "probe", "p", seed=99, start=0, count=3, steps=STEPS, labels=None if not model.num_classes else [1, 2, 3]
    )
    lone = Request("lone", "l", seed=7, start=0, count=1, steps=STEPS, labels=None if not model.num_classes else [5])
    max_batch = 16 * args.requests + 3
    print(f"\n| engine, DDIM {STEPS} | " + " | ".join(f"R = {r}" if r else "whole" for r in args.rows) + " |")
    print("|---" * (len(args.rows) + 1) + "|")
    throughput, solo, held = {}, {}, {}
    for r in args.rows:
        engine_run(model, r, [lone], max_batch)  # warm-up
        seconds, _ = engine_run(model, r, load, max_batch)
        throughput[r] = 16 * args.requests / seconds
        solo[r] = min(engine_run(model, r, [lone], max_batch)[0] for _ in range(args.repeats))
        _, alone = engine_run(model, r, [probe], max_batch)
        _, beside = engine_run(model, r, [*load[:2], probe], max_batch)
        held[r] = "same bytes" if torch.equal(alone["probe"], beside["probe"]) else "differs"
    print(
        f"| {args.requests} × 16 images, images/s | {throughput[0]:.1f} | "
        + " | ".join(f"{throughput[r]:.1f} ({throughput[r] / throughput[0]:.2f}×)" for r in args.rows if r)
        + " |"
    )
    print(
        f"| 1 image alone, s | {solo[0]:.3f} | "
        + " | ".join(f"{solo[r]:.3f} ({solo[r] / solo[0]:.2f}×)" for r in args.rows if r)
        + " |"
    )
    print("| a request alone vs beside two others | " + " | ".join(held[r] for r in args.rows) + " |")


if __name__ == "__main__":
    main()
