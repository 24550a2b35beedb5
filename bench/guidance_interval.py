"""What the guidance interval saves in the engine: guided DDIM rows of the demo model through
DenoisingEngine with the model's interval (null-class twins sent to the network only at the steps
inside it) against the same model told to guide every step, interleaved, in one run.

    python bench/guidance_interval.py [--images 64] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine import ROOT, digits, run_engine  # noqa: E402

from undiffuse import load_model  # noqa: E402
from undiffuse.engine import DenoisingEngine, EngineConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with_interval = load_model(ROOT / "models" / "mnist").eval()
    every_step = copy.copy(with_interval)  # the same network, told to guide every step
    every_step.guidance_interval = None
    assert with_interval.guidance_interval is not None, "the demo model names no guidance interval"
    guided = [replace(r, guidance_scale=3.0) for r in digits(args.images, args.steps, job="g")]
    times: dict[str, list[float]] = {"interval": [], "every step": []}
    for _ in range(args.repeats):  # interleaved, so drift in the machine hits both alike
        for name, model in (("interval", with_interval), ("every step", every_step)):
            engine = DenoisingEngine(model, EngineConfig(max_batch=2 * args.images, latency_slack=None))
            times[name].append(run_engine(engine, guided))
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"| guided DDIM {args.steps}, {args.images} images, guidance 3 | median s | images/s | ratio |")
    print("|---|---|---|---|")
    for name, t in median.items():
        print(f"| {name} | {t:.2f} | {args.images / t:.1f} | {median['every step'] / t:.2f}x |")
    print(f"(runs: {', '.join(f'{k} ' + '/'.join(f'{x:.2f}' for x in v) for k, v in times.items())})")


if __name__ == "__main__":
    main()
