# PYTHON_ARGCOMPLETE_OK
"""The `undiffuse` command line.

Local work: `undiffuse train ...` and `undiffuse sample --model-dir DIR ...`. A client of a
running service (URL and key from --url/--api-key, before or after the command, or
$UNDIFFUSE_URL and $UNDIFFUSE_API_KEY):

    undiffuse submit --num 64 --class 7 --steps 50 --wait --out digits/
    undiffuse jobs list|get|wait|cancel|download|archive|delete ...
    undiffuse models | webhook-secret

One meaning per option across the commands: `--model` names a model the service serves
(`undiffuse models`) and `--model-dir` is a model folder on this machine (`sample`, which still
takes `--model DIR` with a warning); `--class` is one class for every image (`7`) or one per
image (`1,2,3`) in `sample` and `submit` alike.

Exit status (EPILOG): 0 done; 1 the job failed or was canceled, or a download did not match
its manifest; 2 bad arguments (a job id the service could not have issued among them) or a
request the service refused (4xx), with one line on stderr: "undiffuse: error: <reason>"; 3 the
service is unreachable or unavailable (retry later); 4 --timeout ran out before the job ended
(it goes on); 130 interrupted (a submitted job goes on: `undiffuse jobs wait ID`). An API key
about to go over plain http:// to a host other than this machine gets a warning on stderr first.

Shell completion with argcomplete (`pip install argcomplete`, or the `completion` extra):
`eval "$(register-python-argcomplete undiffuse)"` in ~/.bashrc (zsh: the same after
`autoload -U bashcompinit && bashcompinit`).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import NoReturn


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"undiffuse: error: {message}\n")


class UsageError(ValueError):
    """A bad argument value, reported as one line."""


def _positive(name: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _float_pair(text: str) -> tuple[float, float]:
    from undiffuse.config import check_guidance_interval

    try:
        low, high = (float(v) for v in text.split(","))
        check_guidance_interval((low, high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH with 0 <= LOW < HIGH, got {text!r}") from None
    return (low, high)


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def build_parser() -> argparse.ArgumentParser:
    from undiffuse.registry import DEFAULT_SAMPLER, SAMPLERS

    p = _Parser(
        prog="undiffuse",
        description="Train and sample diffusion models on this machine, and submit, follow and download "
        "image-generation jobs of a running undiffuse service.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # the service's options before the command too (`undiffuse --url X jobs list`); the
    # commands' own copies default to "not given", so they never undo these
    p.add_argument("--url", default=None, help=f"the service (default: $UNDIFFUSE_URL or {_DEFAULT_URL})")
    p.add_argument("--api-key", default=None, help="default: $UNDIFFUSE_API_KEY")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train a noise-prediction UNet")
    t.add_argument("--data", required=True, type=Path, help="an IDX images file (.gz ok) or a folder of images")
    t.add_argument("--labels", type=Path, help="IDX labels file (with IDX --data); enables class conditioning")
    t.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, grids, resume state)")
    t.add_argument("--steps", type=_positive("--steps"), default=8000)
    t.add_argument("--batch-size", type=_positive("--batch-size"), default=64)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument(
        "--lr-decay", choices=("constant", "cosine"), default="constant", help="after warm-up; cosine ends at 0"
    )
    t.add_argument("--ema-decay", type=float, default=0.999)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument("--label-dropout", type=float, default=0.1)
    t.add_argument("--checkpoint-every", type=_positive("--checkpoint-every"), default=1000)
    t.add_argument("--image-size", type=_positive("--image-size"), help="default: the data's size")
    t.add_argument("--channels", type=int, choices=(1, 3), help="default: the data's channels")
    t.add_argument("--base-channels", type=_positive("--base-channels"), default=32)
    t.add_argument("--channel-mult", type=_int_tuple, default=(1, 2, 2))
    t.add_argument("--num-res-blocks", type=_positive("--num-res-blocks"), default=1)
    t.add_argument("--attention", type=_int_tuple, default=(7,), help="resolutions with self-attention")
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--schedule", choices=("linear", "cosine"), default="linear")
    t.add_argument("--timesteps", type=_positive("--timesteps"), default=1000)
    t.add_argument("--prediction", choices=("epsilon", "v"), default="epsilon")
    t.add_argument(
        "--guidance-interval",
        type=_float_pair,
        help="LOW,HIGH: the noise levels sigma where classifier-free guidance acts when sampling (default: all)",
    )
    t.add_argument(
        "--mixed-precision",
        choices=("auto", "no", "bf16"),
        default="auto",
        help="auto: bf16/fp16 autocast on CUDA, fp32 on CPU; bf16: autocast on any device (fast on CPUs with AMX)",
    )
    t.add_argument("--max-minutes", type=float, help="stop (and save) after this much wall time, even before --steps")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-resume", action="store_true", help="start over even if --out has a state")
    t.add_argument("--device", default="auto")

    s = sub.add_parser("sample", help="sample images from a model into a PNG grid")
    s.add_argument(
        "--model-dir",
        type=Path,
        metavar="DIR",
        help="required: a model folder on this machine (undiffuse or diffusers), e.g. models/mnist",
    )
    s.add_argument("--model", dest="model_dir", type=Path, action=_DeprecatedFolder, help=argparse.SUPPRESS)
    s.add_argument("--num", type=_positive("--num"), default=16, help="images (default 16)")
    s.add_argument(
        "--steps",
        type=_positive("--steps"),
        default=20,
        help="default 20: DDIM draws the demo model's digits as well at 20 steps as at 50 (docs/quality.md)",
    )
    s.add_argument(
        "--sampler",
        choices=tuple(SAMPLERS),
        default=DEFAULT_SAMPLER,
        help="; ".join(f"{e.name}: {e.summary}" for e in SAMPLERS.values()),
    )
    s.add_argument("--eta", type=float, default=0.0, help="DDIM stochasticity in [0, 1]")
    s.add_argument("--seed", type=int, default=0, help="default 0")
    s.add_argument(
        "--class",
        dest="class_label",
        type=_class_labels,
        metavar="C[,C...]",
        help=CLASS_HELP + " (default for a model with classes: every class in turn, in equal blocks)",
    )
    s.add_argument(
        "--guidance",
        type=float,
        default=None,
        help="classifier-free guidance scale, 1 = none; default 3 for a model with classes and a guidance "
        "interval (the demo model: every digit of 1,000 the class asked for, docs/quality.md), else 1",
    )
    s.add_argument("--nrow", type=_positive("--nrow"), help="images per grid row")
    s.add_argument("--out", type=Path, default=Path("grid.png"), help="the grid's PNG (default grid.png)")
    s.add_argument("--device", default="auto")
    s.add_argument(
        "--invariant-rows",
        type=int,
        default=None,
        help="rows per network call, as the service's UNDIFFUSE_INVARIANT_ROWS (default: 16 on a CPU, whole "
        "batches on a GPU); the same value as a service on the same machine and precision gives its bytes",
    )

    _add_client_commands(sub)
    return p


CLASS_HELP = "one class for every image (7), or one per image (1,2,3)"


class _DeprecatedFolder(argparse.Action):
    """`sample --model DIR`, taken as --model-dir DIR with a warning: scripts that say it keep
    working, while --model means a model the service serves everywhere else."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"undiffuse: warning: sample {option_string} DIR is deprecated, use --model-dir DIR "
            "(--model names a model the service serves)",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def _class_labels(text: str) -> int | list[int]:
    """--class 7 (every image) or --class 1,2,3 (one per image; `7,` is a list of one)."""
    values = _int_tuple(text)
    if not values:
        raise argparse.ArgumentTypeError(f"expected a class or comma-separated classes, got {text!r}")
    return values[0] if len(values) == 1 and "," not in text else list(values)


# The ids the service issues (uuid4().hex). A job id goes into the request's path, so anything
# else ("../webhook-secret") would reach another endpoint with the caller's key.
JOB_ID = re.compile(r"[0-9a-f]{32}")


def _job_id(text: str) -> str:
    if not JOB_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"not a job id: {text!r} (job ids are 32 lowercase hexadecimal digits)")
    return text


def _is_local(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1: traffic that never leaves this machine."""
    if host.rstrip(".").lower() == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def _warn_if_key_in_clear(args: argparse.Namespace) -> None:
    """A warning on stderr when the API key is about to go over plain http:// to another
    machine, where anyone on the path can read it and use it."""
    from urllib.parse import urlsplit

    from undiffuse.client._requests import endpoint

    url, headers = endpoint(args.url, args.api_key)
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:  # not a URL: the client says so
        return
    if "Authorization" in headers and parts.scheme.lower() == "http" and not _is_local(host):
        print(
            f"undiffuse: warning: the API key goes to {host} over plain http://, readable on the way; use https://",
            file=sys.stderr,
        )


# undiffuse.client.DEFAULT_URL, written out so that `train` and `sample` never import the HTTP
# client (httpx, httpx-sse): a GPU training box may have torch alone (a test keeps them equal)
_DEFAULT_URL = "http://127.0.0.1:8000"
SERVICE_COMMANDS = ("submit", "jobs", "models", "webhook-secret")
EPILOG = f"""commands of a running service:
  submit, jobs list|get|wait|cancel|download|archive|delete, models, webhook-secret

the same option means the same in every command:
  --model NAME        a model the service serves (undiffuse models); a folder on this
                      machine is --model-dir DIR (sample)
  --class 7 | 1,2,3   one class for every image, or one per image

environment:
  UNDIFFUSE_URL       the service (default {_DEFAULT_URL}); --url overrides it
  UNDIFFUSE_API_KEY   the API key; --api-key overrides it

exit status:
  0 done; 1 the job failed or was canceled, or a download did not match its manifest;
  2 bad arguments, or the service refused the request (4xx); 3 the service is unreachable
  or unavailable (retry later); 4 --timeout ran out before the job ended; 130 interrupted

shell completion (with argcomplete installed):
  eval "$(register-python-argcomplete undiffuse)"
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("undiffuse")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _body(text: str) -> dict:
    """--body '{"num_images": 4, ...}' or --body @job.json: a submission's JSON body."""
    import json

    source = text
    if text.startswith("@"):
        try:
            source = Path(text[1:]).read_text()
        except OSError as e:
            raise argparse.ArgumentTypeError(f"--body {text}: {e.strerror or e}") from None
    try:
        body = json.loads(source)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--body: not JSON ({e})") from None
    if not isinstance(body, dict):
        raise argparse.ArgumentTypeError("--body: must be a JSON object, as POST /v1/jobs takes")
    return body


def _add_client_commands(sub) -> None:
    from undiffuse.registry import SAMPLER_NAMES

    service = argparse.ArgumentParser(add_help=False)
    service.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"the service (default: $UNDIFFUSE_URL or {_DEFAULT_URL})"
    )
    service.add_argument("--api-key", default=argparse.SUPPRESS, help="default: $UNDIFFUSE_API_KEY")
    service.add_argument("--json", action="store_true", help="print the answer as JSON")
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--out", type=Path, help="when it succeeds, download its images and manifest here")
    waiting.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    waiting.add_argument("--quiet", action="store_true", help="no progress bars")

    s = sub.add_parser("submit", parents=[service, waiting], help="submit a job to a running service")
    s.add_argument("--num", dest="num_images", type=_positive("--num"), default=None, help="images (default 1)")
    s.add_argument("--class", dest="class_label", type=_class_labels, metavar="C[,C...]", help=CLASS_HELP)
    s.add_argument("--steps", type=_positive("--steps"), default=None, help="default: the service's (50)")
    s.add_argument("--sampler", default=None, help=f"{', '.join(SAMPLER_NAMES)} (default: the service's)")
    s.add_argument("--eta", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="default: chosen by the service and shown")
    s.add_argument("--guidance", dest="guidance_scale", type=float, default=None)
    s.add_argument(
        "--model", metavar="NAME", default=None, help="a model the service serves, by name (`undiffuse models`)"
    )
    s.add_argument(
        "--format",
        dest="output_format",
        choices=("png", "jpeg", "webp"),
        default=None,
        help="how the images are stored (default png: lossless)",
    )
    s.add_argument(
        "--quality", dest="output_quality", type=_positive("--quality"), default=None, help="jpeg and webp: 1..100"
    )
    s.add_argument("--previews", action="store_true", default=None, help="stream previews of the first image")
    s.add_argument("--preview-every", type=_positive("--preview-every"), default=None, help="steps between previews")
    s.add_argument("--webhook-url", default=None, help="https:// URL to POST the job's events to, signed")
    s.add_argument(
        "--webhook-event",
        dest="webhook_events",
        action="append",
        choices=("started", "succeeded", "failed", "canceled"),
        help="an event to deliver (repeat it; default: succeeded, failed, canceled)",
    )
    s.add_argument("--idempotency-key", default=None, help="resending with it returns the one job (default: random)")
    s.add_argument(
        "--body",
        type=_body,
        default=None,
        help="the JSON body of POST /v1/jobs, or @FILE holding it; the other flags override its fields",
    )
    s.add_argument("--wait", action="store_true", help="follow it with progress bars until it ends (--out too)")

    jobs = sub.add_parser("jobs", help="list, inspect, wait for, cancel or download jobs").add_subparsers(
        dest="jobs_command", required=True, parser_class=_Parser
    )
    ls = jobs.add_parser("list", parents=[service], help="your jobs, newest first")
    ls.add_argument("--status", choices=("queued", "running", "succeeded", "failed", "canceled"))
    ls.add_argument("--limit", type=_positive("--limit"), default=20, help="jobs per page (at most 100)")
    ls.add_argument("--all", action="store_true", help="every page, not only the first")
    for name, summary in (
        ("get", "a job's status"),
        ("cancel", "cancel a queued or running job"),
        ("delete", "delete a finished job's images and record"),
    ):
        jobs.add_parser(name, parents=[service], help=summary).add_argument("job_id", type=_job_id)
    jobs.add_parser("wait", parents=[service, waiting], help="follow a job until it ends").add_argument(
        "job_id", type=_job_id
    )
    d = jobs.add_parser("download", parents=[service], help="a succeeded job's images and manifest")
    d.add_argument("job_id", type=_job_id)
    d.add_argument("--out", type=Path, required=True)
    a = jobs.add_parser("archive", parents=[service], help="a succeeded job's images and manifest as one ZIP")
    a.add_argument("job_id", type=_job_id)
    a.add_argument("--out", type=Path, required=True, help="the .zip to write")
    sub.add_parser("models", parents=[service], help="the service's models: size, classes, timesteps")
    sub.add_parser("webhook-secret", parents=[service], help="the secret that signs your webhook deliveries")


def _train(args: argparse.Namespace) -> None:
    import torch

    from undiffuse.config import ModelConfig, ScheduleConfig, UNetConfig
    from undiffuse.data import load_idx_dataset, load_image_folder
    from undiffuse.training import TrainConfig, Trainer

    if not args.data.exists():
        raise UsageError(f"--data {args.data}: no such file or folder")
    if args.data.is_dir():
        if args.labels:
            raise UsageError("--labels is for IDX data; a folder's sub-folders are its classes")
        images, labels = load_image_folder(args.data, args.image_size or 32, args.channels or 3)
    else:
        images, labels = load_idx_dataset(args.data, args.labels)
    if args.image_size and images.shape[-1] != args.image_size:
        images = torch.nn.functional.interpolate(images, size=args.image_size, mode="bilinear")
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    if args.max_minutes is not None and not args.max_minutes > 0:
        raise UsageError(f"--max-minutes must be > 0, got {args.max_minutes}")
    num_classes = int(labels.max()) + 1 if labels is not None else None
    unet = UNetConfig(
        image_size=images.shape[-1],
        in_channels=images.shape[1],
        base_channels=args.base_channels,
        channel_mult=args.channel_mult,
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=args.attention,
        dropout=args.dropout,
        num_classes=num_classes,
    )
    config = ModelConfig(
        unet=unet,
        schedule=ScheduleConfig(kind=args.schedule, num_timesteps=args.timesteps),
        prediction_type=args.prediction,
        class_names=tuple(str(i) for i in range(num_classes)) if num_classes else None,
        guidance_interval=args.guidance_interval,
    )
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        lr_decay=args.lr_decay,
        ema_decay=args.ema_decay,
        grad_clip=args.grad_clip,
        label_dropout=args.label_dropout,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
    )
    trainer = Trainer(args.out, config, train_cfg, _device(args.device))
    if not args.no_resume and trainer.resume():
        print(f"resumed from {args.out} at step {trainer.step}", file=sys.stderr)
    trainer.fit(images, labels, max_seconds=None if args.max_minutes is None else args.max_minutes * 60)
    stopped = f" (of {args.steps}: --max-minutes ran out; run again to resume)" if trainer.step < args.steps else ""
    print(f"trained to step {trainer.step}{stopped}; model in {args.out / 'model'}")


def _sample(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm

    from undiffuse.checkpoint import load_model
    from undiffuse.images import make_grid, save_png
    from undiffuse.noise import ImageNoise
    from undiffuse.registry import sampler_entry

    if args.out.suffix.lower() != ".png":
        raise UsageError(f"--out {args.out}: must be a .png path")
    if not 0 <= args.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {args.seed}")
    device = _device(args.device)
    model = load_model(args.model_dir, device)
    if args.invariant_rows is not None:
        if args.invariant_rows < 0:
            raise UsageError(f"--invariant-rows must be >= 0, got {args.invariant_rows}")
        model.invariant_rows = args.invariant_rows
    if args.steps > model.schedule.num_timesteps:
        raise UsageError(f"--steps {args.steps} exceeds the model's {model.schedule.num_timesteps} timesteps")
    labels = None
    if args.class_label is not None:
        labels = torch.tensor(_sample_classes(args.class_label, args.num, model.num_classes), dtype=torch.long)
    elif model.num_classes is not None:
        # every class in turn, in equal consecutive blocks: with --nrow, one row per class
        labels = (torch.arange(args.num) * model.num_classes) // args.num
    options = sampler_entry(args.sampler).select({"eta": args.eta})
    sampler = model.make_sampler(args.sampler, **options)
    guidance = args.guidance
    if guidance is None:
        guidance = 3.0 if model.guidable and model.guidance_interval is not None else 1.0
    elif guidance != 1.0 and not model.guidable:
        raise UsageError("--guidance: the model has no unconditional class to guide against; use 1")
    bar = tqdm(total=args.steps, unit="step", file=sys.stderr)
    x = sampler.sample(
        model.eps,
        model.sample_shape,  # latents for a latent model, decoded below
        steps=args.steps,
        noise=ImageNoise.for_request(args.seed, args.num, device),
        class_labels=labels,
        guidance_scale=guidance,
        guidance_interval=model.guidance_interval,
        callback=lambda *_: bar.update(1),
        device=device,
    )
    bar.close()
    with torch.no_grad():
        images = model.decode(x)
    save_png(make_grid(images, nrow=args.nrow), args.out)
    print(f"wrote {args.num} images to {args.out}")


def _sample_classes(given: int | list[int], num: int, num_classes: int | None) -> list[int]:
    """--class for `sample`: as `submit` sends it, one class for every image or one per image."""
    if num_classes is None:
        raise UsageError("--class given but the model is unconditional")
    classes = [given] * num if isinstance(given, int) else given
    if len(classes) != num:
        raise UsageError(f"--class lists {len(classes)} classes for --num {num} images: give one, or one per image")
    for c in classes:
        if not 0 <= c < num_classes:
            raise UsageError(f"--class must be in [0, {num_classes - 1}], got {c}")
    return classes


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:  # a shell asking for completions (argcomplete's protocol)
        _complete(parser)
    args = parser.parse_args(argv)
    if args.command == "sample" and args.model_dir is None:
        parser.error("sample: the following arguments are required: --model-dir")
    if args.command in SERVICE_COMMANDS:
        from undiffuse.client_cli import run

        _warn_if_key_in_clear(args)
        return run(args)
    from undiffuse.config import CheckpointError
    from undiffuse.data import DatasetError

    try:
        {"train": _train, "sample": _sample}[args.command](args)
    except KeyboardInterrupt:
        print("undiffuse: interrupted", file=sys.stderr)
        return 130
    except (UsageError, CheckpointError, DatasetError, ValueError, OSError) as e:
        print(f"undiffuse: error: {e}", file=sys.stderr)
        return 2
    return 0


def _complete(parser: argparse.ArgumentParser) -> None:
    """Print the completions a shell asked for and exit; nothing without argcomplete."""
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


if __name__ == "__main__":
    sys.exit(main())
