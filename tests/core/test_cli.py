import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from undiffuse.cli import main
from undiffuse.data import DatasetError, load_idx_dataset, read_idx


def _write_idx(path, arr: np.ndarray):
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def idx_data(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (16, 8, 8)), rng.integers(0, 3, (16,))
    labels[:3] = [0, 1, 2]
    _write_idx(tmp_path / "img.gz", images)
    _write_idx(tmp_path / "lab.gz", labels)
    return tmp_path / "img.gz", tmp_path / "lab.gz", images


def test_read_idx_round_trip_and_range(idx_data):
    img, lab, images = idx_data
    assert np.array_equal(read_idx(img), images)
    x, y = load_idx_dataset(img, lab)
    assert x.shape == (16, 1, 8, 8) and y.shape == (16,)
    assert x.min() >= -1 and x.max() <= 1


def test_read_idx_rejects_truncated_file(tmp_path, idx_data):
    img, _, _ = idx_data
    raw = gzip.decompress(img.read_bytes())
    bad = tmp_path / "bad.gz"
    bad.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DatasetError, match="bad.gz: payload has"):
        read_idx(bad)


def _train(img, lab, run, steps: int) -> int:
    """A tiny training run through the CLI."""
    small = "--base-channels 16 --channel-mult 1,2 --batch-size 4 --attention="
    return main(
        [
            "train",
            "--data",
            str(img),
            "--labels",
            str(lab),
            "--out",
            str(run),
            "--steps",
            str(steps),
            "--checkpoint-every",
            str(steps),
            *small.split(),
        ]
    )


def test_train_then_sample_end_to_end(tmp_path, idx_data, capsys):
    img, lab, _ = idx_data
    run = tmp_path / "run"
    assert _train(img, lab, run, steps=3) == 0
    out = tmp_path / "grid.png"
    sample = f"sample --model {run / 'model'} --num 6 --steps 4 --class 2 --nrow 3 --out {out} --sampler ddpm"
    assert main(sample.split()) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 10 + 2, 2 * 10 + 2)  # 8 px tiles, 2 px padding
    # resume picks up where it stopped
    assert _train(img, lab, run, steps=5) == 0
    assert "resumed from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--model", "/nonexistent"], "/nonexistent: model folder not found"),
        (["sample", "--model", "x", "--num", "0"], "--num must be >= 1, got 0"),
        (["sample", "--model", "x", "--sampler", "euler"], "invalid choice: 'euler'"),
        (["sample", "--model", "x", "--out", "a.jpg"], "must be a .png path"),
        (["train", "--data", "/nonexistent", "--out", "/tmp/x"], "no such file or folder"),
        (["train", "--data", "x", "--out", "/tmp/x", "--mixed-precision", "fp8"], "invalid choice: 'fp8'"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_nonzero_with_one_line(args, message):
    proc = subprocess.run([sys.executable, "-m", "undiffuse.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("undiffuse: error:") and message in lines[0]


def test_sample_checks_class_against_model(tmp_path, idx_data):
    img, lab, _ = idx_data
    run = tmp_path / "run"
    _train(img, lab, run, steps=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "undiffuse.cli",
            "sample",
            "--model",
            str(run / "model"),
            "--class",
            "3",
            "--out",
            str(tmp_path / "g.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--class must be in [0, 2], got 3" in proc.stderr


def test_train_refuses_a_non_positive_time_limit(tmp_path, idx_data):
    img, lab, _ = idx_data
    args = ["train", "--data", str(img), "--labels", str(lab), "--out", str(tmp_path / "run"), "--max-minutes", "0"]
    proc = subprocess.run([sys.executable, "-m", "undiffuse.cli", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "undiffuse: error: --max-minutes must be > 0, got 0.0"
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_train_and_sample_do_not_need_the_http_client():
    """`undiffuse train` ran on a GPU machine with torch alone once httpx-sse was missing there:
    building the parser must not import the client; its help names the client's default URL."""
    code = (
        "import sys; sys.modules['httpx'] = sys.modules['httpx_sse'] = None\n"
        "from undiffuse.cli import build_parser\n"
        "p = build_parser(); p.parse_args(['train', '--data', 'x', '--out', 'y'])\n"
        "print('undiffuse.client' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    from undiffuse import cli, client

    assert cli._DEFAULT_URL == client.DEFAULT_URL
