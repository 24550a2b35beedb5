import gzip
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
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


@pytest.mark.slow
def test_train_then_sample_end_to_end(tmp_path, idx_data, capsys):
    img, lab, _ = idx_data
    run = tmp_path / "run"
    assert _train(img, lab, run, steps=3) == 0
    out = tmp_path / "grid.png"
    sample = f"sample --model-dir {run / 'model'} --num 6 --steps 4 --class 2 --nrow 3 --out {out} --sampler ddpm"
    assert main(sample.split()) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 10 + 2, 2 * 10 + 2)  # 8 px tiles, 2 px padding
    # resume picks up where it stopped
    assert _train(img, lab, run, steps=5) == 0
    assert "resumed from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--model-dir", "/nonexistent"], "/nonexistent: model folder not found"),
        (["sample", "--model-dir", "x", "--num", "0"], "--num must be >= 1, got 0"),
        (["sample", "--model-dir", "x", "--sampler", "euler"], "invalid choice: 'euler'"),
        (["sample", "--model-dir", "x", "--out", "a.jpg"], "must be a .png path"),
        (["sample", "--num", "4"], "the following arguments are required: --model-dir"),
        (["sample", "--model-dir", "x", "--class", "1,x"], "expected comma-separated integers"),
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


def _sample(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "undiffuse.cli", "sample", *args], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_sample_checks_class_against_model(tmp_path, idx_data):
    img, lab, _ = idx_data
    run = tmp_path / "run"
    _train(img, lab, run, steps=1)
    model, out = str(run / "model"), str(tmp_path / "g.png")
    proc = _sample("--model-dir", model, "--class", "3", "--out", out)
    assert proc.returncode == 2 and "--class must be in [0, 2], got 3" in proc.stderr
    listed = _sample("--model-dir", model, "--num", "3", "--class", "0,1,5", "--out", out)
    assert listed.returncode == 2 and "--class must be in [0, 2], got 5" in listed.stderr
    short = _sample("--model-dir", model, "--num", "4", "--class", "0,1", "--out", out)
    assert short.returncode == 2 and "--class lists 2 classes for --num 4 images" in short.stderr
    assert not (tmp_path / "g.png").exists()


@pytest.mark.slow
def test_sample_takes_one_class_per_image_as_submit_does(tmp_path, idx_data, capsys):
    img, lab, _ = idx_data
    run = tmp_path / "run"
    _train(img, lab, run, steps=1)
    out = tmp_path / "g.png"
    args = ["sample", "--model-dir", str(run / "model"), "--num", "3", "--steps", "2", "--out", str(out)]
    assert main([*args, "--class", "2,0,1", "--nrow", "3"]) == 0
    with Image.open(out) as im:
        assert im.size == (3 * 10 + 2, 10 + 2)


@pytest.mark.slow
def test_sample_model_is_a_deprecated_name_for_model_dir(tmp_path, idx_data):
    """`sample --model DIR` keeps working, with one warning line: --model names a served model."""
    img, lab, _ = idx_data
    run = tmp_path / "run"
    _train(img, lab, run, steps=1)
    proc = _sample("--model", str(run / "model"), "--num", "2", "--steps", "2", "--out", str(tmp_path / "g.png"))
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("undiffuse: warning:")]
    assert warnings == [
        "undiffuse: warning: sample --model DIR is deprecated, use --model-dir DIR "
        "(--model names a model the service serves)"
    ]
    assert (tmp_path / "g.png").exists()


def test_model_and_class_mean_the_same_in_sample_and_submit():
    from undiffuse.cli import build_parser

    parse = build_parser().parse_args
    for command in (["sample", "--model-dir", "m"], ["submit"]):
        assert parse([*command, "--class", "7"]).class_label == 7  # every image
        assert parse([*command, "--class", "1,2,3"]).class_label == [1, 2, 3]  # one per image
        assert parse([*command, "--class", "4,"]).class_label == [4]
    assert parse(["submit", "--model", "mnist"]).model == "mnist"  # a served model's name
    assert str(parse(["sample", "--model-dir", "models/mnist"]).model_dir) == "models/mnist"
    text = build_parser().format_help()
    assert "--model NAME" in text and "--model-dir DIR" in text and "--class 7 | 1,2,3" in text


def test_shell_completion_through_argcomplete(tmp_path):
    """What bash asks of `eval "$(register-python-argcomplete undiffuse)"`, answered."""
    import os

    answers = {}
    for line in ("undiffuse jobs l", "undiffuse sample --model-", "undiffuse sub"):
        out = tmp_path / "completions"
        env = {
            **os.environ,
            "_ARGCOMPLETE": "1",
            "_ARGCOMPLETE_STDOUT_FILENAME": str(out),
            "_ARGCOMPLETE_IFS": "\n",
            "COMP_LINE": line,
            "COMP_POINT": str(len(line)),
        }
        proc = subprocess.run([sys.executable, "-m", "undiffuse.cli"], env=env, capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        answers[line] = out.read_text().split()
    assert answers["undiffuse jobs l"] == ["list"]
    assert answers["undiffuse sample --model-"] == ["--model-dir"]  # the deprecated --model is not offered
    assert answers["undiffuse sub"] == ["submit"]


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


# --- the client commands' own checks --------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ["jobs", "get", "../webhook-secret"],
        ["jobs", "cancel", "../../v1/jobs"],
        ["jobs", "wait", "0123456789abcdef0123456789abcdef/../x"],
        ["jobs", "download", "0123456789ABCDEF0123456789ABCDEF", "--out", "x"],  # the service's ids are lowercase
        ["jobs", "get", "0123456789abcdef0123456789abcde"],  # one digit short
        ["jobs", "get", "%2e%2e%2fwebhook-secret"],
        ["jobs", "get", "0123456789abcdef0123456789abcdef\nX-Evil: 1"],
    ],
)
def test_a_job_id_the_service_could_not_have_issued_is_refused_before_any_request(args, capsys, monkeypatch):
    """A job id goes into the request's path: `../webhook-secret` would have sent the key to
    another endpoint. (The URL points at a closed port: a request would have exited 3.)"""
    monkeypatch.setenv("UNDIFFUSE_API_KEY", "k")
    with pytest.raises(SystemExit) as exited:
        main([*args, "--url", "http://127.0.0.1:9"])
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("undiffuse: error: argument job_id: not a job id: "), lines


def test_a_job_id_as_issued_is_taken(monkeypatch):
    from undiffuse import client_cli

    seen = []
    monkeypatch.setattr(client_cli, "run", lambda args: seen.append(args.job_id) or 0)
    assert main(["jobs", "get", "0123456789abcdef0123456789abcdef"]) == 0
    assert seen == ["0123456789abcdef0123456789abcdef"]


@pytest.mark.parametrize(
    ("url", "key_from", "warned"),
    [
        ("http://undiffuse.example.com", "--api-key", True),
        ("http://10.0.0.8:8000", "env", True),  # a private network is still a network
        ("http://128.0.0.1:8000", "--api-key", True),
        ("HTTP://Undiffuse.Example.com/", "env", True),
        ("https://undiffuse.example.com", "--api-key", False),
        ("http://localhost:8000", "--api-key", False),
        ("http://LOCALHOST.:8000", "env", False),
        ("http://127.0.0.1:8000", "env", False),
        ("http://127.8.9.10:8000", "--api-key", False),
        ("http://[::1]:8000", "--api-key", False),
        ("http://undiffuse.example.com", None, False),  # no key, nothing to leak
    ],
)
def test_an_api_key_about_to_go_over_plain_http_to_another_machine_is_warned_about(
    url, key_from, warned, capsys, monkeypatch
):
    from undiffuse import client_cli

    monkeypatch.setattr(client_cli, "run", lambda args: 0)  # nothing is sent
    monkeypatch.delenv("UNDIFFUSE_API_KEY", raising=False)
    monkeypatch.setenv("UNDIFFUSE_URL", url)
    args = ["jobs", "list"]
    if key_from == "--api-key":
        args += ["--api-key", "ud_secret"]
    elif key_from == "env":
        monkeypatch.setenv("UNDIFFUSE_API_KEY", "ud_secret")
    assert main(args) == 0
    err = capsys.readouterr().err
    if warned:
        assert err.count("\n") == 1 and err.startswith("undiffuse: warning: the API key goes to "), err
        assert "plain http://" in err and "ud_secret" not in err
    else:
        assert err == ""


def test_the_url_argument_is_what_the_warning_looks_at(capsys, monkeypatch):
    from undiffuse import client_cli

    monkeypatch.setattr(client_cli, "run", lambda args: 0)
    monkeypatch.setenv("UNDIFFUSE_URL", "http://127.0.0.1:8000")
    monkeypatch.setenv("UNDIFFUSE_API_KEY", "ud_secret")
    assert main(["submit", "--url", "http://gpu-box.example:8000"]) == 0
    assert "the API key goes to gpu-box.example over plain http://" in capsys.readouterr().err


def test_version_and_help_tell_commands_environment_and_exit_codes(capsys):
    from undiffuse.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("undiffuse ")
    text = build_parser().format_help()
    for word in ("submit", "webhook-secret", "UNDIFFUSE_URL", "UNDIFFUSE_API_KEY", "exit status", "4 --timeout"):
        assert word in text, word


def test_service_options_go_before_or_after_the_command():
    from undiffuse.cli import build_parser

    parse = build_parser().parse_args
    assert parse(["--url", "http://a:1", "jobs", "list"]).url == "http://a:1"
    assert parse(["jobs", "list", "--url", "http://b:2"]).url == "http://b:2"
    assert parse(["--url", "http://a:1", "jobs", "list", "--url", "http://b:2"]).url == "http://b:2"
    assert parse(["jobs", "list"]).url is None  # then $UNDIFFUSE_URL
    assert parse(["--api-key", "k", "models"]).api_key == "k"


def test_a_submission_body_from_a_file_and_bad_ones(tmp_path, capsys):
    from undiffuse.cli import build_parser, main

    body = tmp_path / "job.json"
    body.write_text('{"num_images": 3, "class_label": 2}')
    args = build_parser().parse_args(["submit", "--body", f"@{body}", "--steps", "7", "--webhook-event", "started"])
    assert args.body == {"num_images": 3, "class_label": 2} and args.steps == 7 and args.webhook_events == ["started"]
    for bad, message in (
        (f"@{tmp_path / 'missing.json'}", "No such file"),
        ("[1, 2]", "JSON object"),
        ("{", "not JSON"),
    ):
        with pytest.raises(SystemExit) as refused:
            main(["submit", "--body", bad])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_sample_defaults_to_guidance_inside_the_interval_and_20_steps(monkeypatch, tmp_path):
    """The demo model (classes and a guidance interval): 20 steps at guidance 3 unless told;
    --guidance 1 turns it off. (docs/quality.md: DDIM 20 at guidance 3 in the interval draws the
    requested digit every time, unguided 0.967.)"""
    from undiffuse import samplers

    seen = []

    def sample(self, eps, shape, *, steps, guidance_scale, guidance_interval, **kw):
        seen.append((steps, guidance_scale, guidance_interval))
        return torch.zeros(2, *shape)

    monkeypatch.setattr(samplers.Sampler, "sample", sample)
    demo = str(Path(__file__).resolve().parents[2] / "models" / "mnist")
    out = str(tmp_path / "g.png")
    assert main(["sample", "--model-dir", demo, "--num", "2", "--out", out]) == 0
    assert main(["sample", "--model-dir", demo, "--num", "2", "--guidance", "1", "--out", out]) == 0
    assert [(s, g) for s, g, _ in seen] == [(20, 3.0), (20, 1.0)]
    assert seen[0][2] is not None  # the demo model's interval, which the default relies on
