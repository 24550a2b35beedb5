"""Quality per step for the served model: class accuracy and a Fréchet distance by the
independent judge (bench/judge.py), and images/s, per sampler, step count and guidance scale.

    python bench/quality.py                       # the full table: 1,000 digits (100 per class) per row
    python bench/quality.py --n 200 --rows quick  # what fits a 2-core CPU in ~15 minutes
    python bench/quality.py --guidance-study      # why guidance hurt DDIM (DDIM variants)
    python bench/quality.py --rows targets        # the three quality targets, 1,000 digits per row
    python bench/quality.py --interval-study --n 500   # guidance on all steps vs a noise interval
    python bench/quality.py --model runs/mnist-ft/model --rows targets   # a candidate model

Prints a Markdown table (and writes it with --out); docs/quality.md records the runs with the
machine they ran on. Every row samples the same noise (seed 0, image i = index i) and the same
labels (i // (n / 10)), so rows differ only by sampler, steps and guidance.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from judge import ROOT, Scorer, frechet_distance, predict  # noqa: E402

from undiffuse import ImageNoise, load_model  # noqa: E402
from undiffuse.config import Thresholding  # noqa: E402
from undiffuse.images import make_grid, save_png  # noqa: E402
from undiffuse.registry import make_sampler  # noqa: E402
from undiffuse.samplers import C_EPS, C_EPS_X0, DDIMSampler  # noqa: E402

FULL = [
    *[("ddpm", steps, w) for steps in (100, 1000) for w in (1.0, 2.0, 3.0)],
    *[(name, steps, w) for name in ("ddim", "dpmpp_2m") for steps in (10, 20, 50, 100, 1000) for w in (1.0, 2.0, 3.0)],
    *[("dpmpp_2m_logsnr", steps, w) for steps in (10, 20, 50) for w in (1.0, 2.0, 3.0)],
]
QUICK = [
    ("ddpm", 100, 1.0),
    *[(name, steps, 1.0) for name in ("ddim", "dpmpp_2m") for steps in (10, 20, 50)],
    *[(name, 20, w) for name in ("ddim", "dpmpp_2m") for w in (2.0, 3.0)],
    ("dpmpp_2m", 10, 3.0),
]
TARGETS = [
    ("ddim", 20, 1.0), ("ddim", 20, 1.0, "model", (("eta", 1.0),)), ("ddim", 50, 1.0), ("dpmpp_2m", 10, 1.0),
    ("dpmpp_2m_logsnr", 10, 1.0), ("ddim", 20, 3.0),
    ("ddim", 20, 3.0, None),  # guidance at every step, for comparison with the model's interval
]  # fmt: skip
ROWS = {"full": FULL, "quick": QUICK, "targets": TARGETS}
SERVED = ROOT / "models" / "mnist"


class RawEpsDDIM(DDIMSampler):
    """DDIM with the clipped x0 beside the raw eps: the variant the guidance study compares against."""

    @property
    def terms(self) -> frozenset[str]:
        return self._limit_terms | {"eps"}

    def _mix(self, *levels):
        mix = super()._mix(*levels)
        if C_EPS_X0 in mix:  # the direction on the network's eps, not the one the clipped x0 implies
            mix[C_EPS] = mix.pop(C_EPS_X0)
        return mix


def sample(
    model, sampler, steps: int, labels: torch.Tensor, guidance: float, device: str, seed: int = 0, interval="model"
) -> tuple[torch.Tensor, float]:
    """Samples [n, 1, 28, 28] and their images/s; guidance acts on the model's interval unless
    `interval` says otherwise (None: every step)."""
    if device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    x = sampler.sample(
        model.eps, model.image_shape, steps=steps, noise=ImageNoise.for_request(seed, len(labels), device=device),
        class_labels=labels.to(device), guidance_scale=guidance, device=device,
        guidance_interval=model.guidance_interval if interval == "model" else interval,
    )  # fmt: skip
    if device == "cuda":
        torch.cuda.synchronize()
    return x.cpu(), len(labels) / (time.perf_counter() - started)


def table(
    rows: list[tuple],
    n: int,
    device: str,
    grid_dir: Path | None,
    model_dir: Path = SERVED,
    max_seconds: float | None = None,
) -> str:
    """The rows in their listed order. With max_seconds, the cheapest rows run first and a row
    that would not finish in time (at the network rows per second measured so far) is listed as
    not run; the grids come first."""
    model = load_model(model_dir).to(device)
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    if grid_dir is not None:
        grids(model, grid_dir, device)
    scorer = Scorer()
    labels = torch.arange(10).repeat_interleave(n // 10)
    lines = [
        "| sampler | steps | guidance | class accuracy | Fréchet distance | near-copies | images/s |",
        "|---|---|---|---|---|---|---|",
    ]

    def cost(row: tuple) -> float:  # network rows per image: twins at about half the steps, or all
        return row[1] * (1.0 if row[2] == 1.0 else 2.0 if row[3:4] == (None,) else 1.5)

    done: dict[tuple, str] = {}
    order = sorted(rows, key=cost) if deadline else rows
    per_cost = 0.0  # seconds per unit of cost, as the last row ran
    for row in order:
        # optional 4th element: the guidance interval ("model", or None: every step); 5th: sampler
        # options as (name, value) pairs, e.g. (("eta", 1.0),)
        name, steps, guidance, where, options = (*row, *("model", ())[len(row) - 3 :])
        note = " (every step)" if where is None else ""
        label = name + "".join(f" ({k} {v:g})" for k, v in options)
        if deadline is not None and time.monotonic() + per_cost * cost(row) > deadline:
            done[row] = f"| {label} | {steps} | {guidance:g}{note} | not run (time limit) | | | |"
            continue
        started = time.monotonic()
        sampler = make_sampler(name, model.schedule, **dict(options))
        x, rate = sample(model, sampler, steps, labels, guidance, device, interval=where)
        per_cost = (time.monotonic() - started) / cost(row)
        accuracy, distance = scorer.score(x, labels)
        copies = scorer.near_copies(x)
        done[row] = (
            f"| {label} | {steps} | {guidance:g}{note} | {accuracy:.3f} | {distance:.1f} | {copies:.3f} | {rate:,.1f} |"
        )
        print(done[row], flush=True)
    lines += [done[row] for row in rows]
    return "\n".join(lines)


def grids(model, grid_dir: Path, device: str) -> None:
    """A 10-step grid per sampler: one row per class, 10 digits each (seed 0)."""
    labels = torch.arange(10).repeat_interleave(10)
    for name in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_logsnr"):
        x, _ = sample(model, make_sampler(name, model.schedule), 10, labels, 1.0, device)
        save_png(make_grid(x, nrow=10), grid_dir / f"quality-grid-{name}-10.png")


def guidance_study(n: int, steps: int, device: str, seed: int) -> str:
    model = load_model(ROOT / "models" / "mnist").to(device)
    scorer = Scorer()
    labels = torch.arange(10).repeat_interleave(n // 10)
    variants = {
        "x0 clipped, raw eps (before the fix)": RawEpsDDIM(model.schedule),
        "x0 not clipped": DDIMSampler(model.schedule, clip_x0=False),
        "x0 clipped, eps from the clipped x0 (now)": DDIMSampler(model.schedule),
        "dynamic thresholding, eps from x0": DDIMSampler(model.schedule, thresholding=Thresholding()),
    }
    lines = [
        f"| DDIM {steps} steps, {n} digits | guidance | class accuracy | Fréchet distance |",
        "|---|---|---|---|",
    ]
    for label, sampler in variants.items():
        for guidance in (1.0, 2.0, 3.0):
            x, _ = sample(model, sampler, steps, labels, guidance, device, seed, interval=None)
            accuracy, distance = scorer.score(x, labels)
            lines.append(f"| {label} | {guidance:g} | {accuracy:.3f} | {distance:.1f} |")
            print(lines[-1], flush=True)
    x, _ = sample(model, DDIMSampler(model.schedule), steps, torch.full_like(labels, -1), 1.0, device, seed)
    classes, features = predict(scorer.judge, x)
    counts = torch.bincount(classes, minlength=10).tolist()
    distance = frechet_distance(features, scorer.real_features)
    lines.append(f"\nnull class alone: digits per class {counts}, distance {distance:.1f}")
    print(lines[-1], flush=True)
    return "\n".join(lines)


def interval_study(n: int, steps: int, device: str, model_dir: Path, seed: int) -> str:
    """DDIM at guidance 2 and 3 with guidance at every step and on sigma intervals only
    (Kynkaanniemi et al. 2024), against no guidance; sigma_t = sqrt((1 - a_bar) / a_bar)."""
    model = load_model(model_dir).to(device)
    scorer = Scorer()
    labels = torch.arange(10).repeat_interleave(n // 10)
    intervals = {"every step": None, "sigma in (0.28, 5.42]": (0.28, 5.42),
                 "sigma <= 5.42": (0.0, 5.42), "sigma in (0.28, 2]": (0.28, 2.0)}  # fmt: skip
    lines = [
        f"| DDIM {steps} steps, {n} digits | guidance | class accuracy | Fréchet distance | images/s |",
        "|---|---|---|---|---|",
    ]
    x, rate = sample(model, DDIMSampler(model.schedule), steps, labels, 1.0, device, seed)
    accuracy, distance = scorer.score(x, labels)
    lines.append(f"| no guidance | 1 | {accuracy:.3f} | {distance:.1f} | {rate:.1f} |")
    print(lines[-1], flush=True)
    for label, interval in intervals.items():
        for guidance in (2.0, 3.0):
            x, rate = sample(model, DDIMSampler(model.schedule), steps, labels, guidance, device, seed, interval)
            accuracy, distance = scorer.score(x, labels)
            lines.append(f"| {label} | {guidance:g} | {accuracy:.3f} | {distance:.1f} | {rate:.1f} |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def _row_key(spec: str, parser: argparse.ArgumentParser) -> tuple[str, int, float]:
    """A spec like dpmpp_2m:1000:3 as the first three fields of a row: ("dpmpp_2m", 1000, 3.0)."""
    try:
        name, steps, guidance = spec.split(":")
        return name, int(steps), float(guidance)
    except ValueError:
        parser.error(f"--only {spec}: expected SAMPLER:STEPS:GUIDANCE, e.g. dpmpp_2m:1000:3")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1000, help="digits per row (a multiple of 10)")
    p.add_argument("--rows", choices=list(ROWS), default="full")
    p.add_argument("--model", type=Path, default=SERVED, help="model folder (default: the served demo model)")
    p.add_argument("--guidance-study", action="store_true")
    p.add_argument("--interval-study", action="store_true", help="guidance on a sigma interval only")
    p.add_argument("--steps", type=int, default=20, help="steps of the guidance and interval studies")
    p.add_argument(
        "--seed", type=int, default=0, help="noise seed of the studies (docs/quality.md: 123 for the guidance study)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the Markdown table here")
    p.add_argument("--grids", type=Path, help="write a 10-step sample grid per sampler into this folder")
    p.add_argument(
        "--max-minutes", type=float, help="table: cheapest rows first; a row that would not finish in time is not run"
    )
    p.add_argument(
        "--only", metavar="SAMPLER:STEPS:GUIDANCE", action="append",
        help="run only these rows of --rows, e.g. dpmpp_2m:1000:3 (repeatable)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.n % 10:
        p.error("--n must be a multiple of 10")
    if args.only and (args.guidance_study or args.interval_study):
        p.error("--only selects rows of the table, not of a study")
    if args.device == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads()))
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"device: {name}, torch {torch.__version__}", flush=True)
    if args.guidance_study:
        text = guidance_study(args.n, args.steps, args.device, args.seed)
    elif args.interval_study:
        text = interval_study(args.n, args.steps, args.device, args.model, args.seed)
    else:
        limit = None if args.max_minutes is None else args.max_minutes * 60
        rows = ROWS[args.rows]
        if args.only:  # every row matching a spec (in --rows targets a spec can match two)
            specs = {spec: _row_key(spec, p) for spec in args.only}
            for spec, key in specs.items():
                if not any(row[:3] == key for row in rows):
                    p.error(f"--only {spec} matches no row of --rows {args.rows}")
            rows = [row for row in rows if row[:3] in specs.values()]
        text = table(rows, args.n, args.device, args.grids, args.model, limit)
    if args.out:
        args.out.write_text(f"device: {name}\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
