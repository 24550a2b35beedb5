"""An independent judge of generated digits: a small MNIST classifier, trained here on the shared
MNIST data (never shipped in the service), giving class accuracy and a Fréchet distance between
its penultimate-layer features of generated and real digits (an FID with an MNIST feature
extractor instead of Inception).

    python bench/judge.py train      # ~2 min on 2 CPU cores; writes bench/judge.safetensors
    python bench/judge.py check      # held-out accuracy, and the distance of real digits to real

The shared data are MNIST's 10,000-digit test set: the judge trains on the first 8,000 and is
checked on the last 2,000 (the "real" reference for the distance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent
MNIST = Path(os.environ.get("UNDIFFUSE_MNIST", ROOT.parent / "shared" / "datasets" / "mnist"))  # the IDX files
WEIGHTS = Path(__file__).resolve().parent / "judge.safetensors"
TRAIN, HELD_OUT = slice(0, 8000), slice(8000, 10000)


class Judge(nn.Module):
    """[N, 1, 28, 28] in [-1, 1] -> logits [N, 10]; `features` -> [N, 128]."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(3),  # 3x3
        )  # fmt: skip
        self.fc = nn.Linear(64 * 9, 128)
        self.head = nn.Linear(128, 10)

    def features(self, x: Tensor) -> Tensor:
        return F.relu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.dropout(self.features(x), 0.3, self.training))


def mnist() -> tuple[Tensor, Tensor]:
    from undiffuse.data import load_idx_dataset

    x, y = load_idx_dataset(MNIST / "t10k-images-idx3-ubyte.gz", MNIST / "t10k-labels-idx1-ubyte.gz")
    return x, y


def _shifted(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random shifts of up to 2 pixels (one per batch: cheap augmentation)."""
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def train(epochs: int = 12, batch: int = 128, seed: int = 0) -> Judge:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x, y = mnist()
    x, y = x[TRAIN], y[TRAIN]
    judge = Judge()
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    steps = epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    judge.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for k in range(len(x) // batch):
            idx = order[k * batch : (k + 1) * batch]
            loss = F.cross_entropy(judge(_shifted(x[idx], gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return judge.eval()


def load() -> Judge:
    if not WEIGHTS.exists():
        raise SystemExit(f"{WEIGHTS} is missing: run `python bench/judge.py train` first")
    judge = Judge()
    judge.load_state_dict(load_file(WEIGHTS))
    return judge.eval()


@torch.no_grad()
def predict(judge: Judge, images: Tensor, batch: int = 1000) -> tuple[Tensor, Tensor]:
    """(predicted classes [N], features [N, 128]) of images [N, 1, 28, 28] in [-1, 1]."""
    classes, feats = [], []
    for chunk in images.float().clamp(-1, 1).split(batch):
        f = judge.features(chunk)
        feats.append(f)
        classes.append(judge.head(f).argmax(1))
    return torch.cat(classes), torch.cat(feats)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) of two feature sets [N, D]
    (float64; the matrix square roots by symmetric eigendecomposition)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)

    def sqrtm(m: Tensor) -> Tensor:
        w, v = torch.linalg.eigh((m + m.T) / 2)
        return (v * w.clamp(min=0).sqrt()) @ v.T

    root_a = sqrtm(s_a)
    cross = sqrtm(root_a @ s_b @ root_a)
    return float((mu_a - mu_b).square().sum() + torch.trace(s_a + s_b - 2 * cross))


def nearest_distances(queries: Tensor, pool: Tensor, own: Tensor | None = None, chunk: int = 500) -> Tensor:
    """[N] Euclidean pixel distance of each query [N, 1, 28, 28] to its nearest image in pool
    [M, 1, 28, 28], both in [-1, 1]; own [N] long: each query's own index in pool, which it must
    not match (leave-one-out), or None when the queries are not in pool."""
    q, p = queries.float().clamp(-1, 1).flatten(1), pool.float().flatten(1)
    out = []
    for start in range(0, len(q), chunk):
        d = torch.cdist(q[start : start + chunk], p)
        if own is not None:
            d[torch.arange(len(d)), own[start : start + chunk]] = float("inf")
        out.append(d.min(1).values)
    return torch.cat(out)


class Scorer:
    """Scores generated digits against the held-out real ones, and checks them for near-copies of
    the generator's training digits (all 10,000 shared digits)."""

    COPY_QUANTILE = 0.01  # a "near-copy" is nearer its nearest training digit than 99 % of real digits are

    def __init__(self) -> None:
        self.judge = load()
        x, y = mnist()
        self.real_x, self.real_y = x[HELD_OUT], y[HELD_OUT]
        _, self.real_features = predict(self.judge, self.real_x)
        self.training_x = x  # what models/mnist trained on
        # each held-out digit's nearest *other* digit of the 10,000
        real_nearest = nearest_distances(self.real_x, x, own=torch.arange(len(x))[HELD_OUT])
        self.copy_distance = float(real_nearest.quantile(self.COPY_QUANTILE))

    def near_copies(self, images: Tensor) -> float:
        """The fraction of images [N, 1, 28, 28] nearer (in pixels) to some training digit than
        all but 1 % of real digits are to their nearest other digit: 0.01 for real digits, far
        above it for a model that reproduces its training set."""
        return float((nearest_distances(images, self.training_x) < self.copy_distance).float().mean())

    def score(self, images: Tensor, labels: Tensor) -> tuple[float, float]:
        """(class accuracy, Fréchet distance to real held-out digits) of images [N, 1, 28, 28]."""
        classes, feats = predict(self.judge, images)
        return float((classes == labels).float().mean()), frechet_distance(feats, self.real_features)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["train", "check"])
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.command == "train":
        started = time.perf_counter()
        judge = train()
        save_file(judge.state_dict(), WEIGHTS)
        print(f"trained in {time.perf_counter() - started:.0f} s; wrote {WEIGHTS}")
    scorer = Scorer()
    accuracy = float((predict(scorer.judge, scorer.real_x)[0] == scorer.real_y).float().mean())
    x, _ = mnist()
    _, train_features = predict(scorer.judge, x[TRAIN][:2000])
    fd = frechet_distance(train_features, scorer.real_features)
    print(f"held-out accuracy {accuracy:.4f} on 2,000 real digits; Fréchet distance real-to-real {fd:.2f}")
    print(f"near-copy distance (1st percentile of real digits' nearest other digit): {scorer.copy_distance:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
