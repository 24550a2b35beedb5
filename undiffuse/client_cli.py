"""The client commands of the `undiffuse` command line (`submit`, `jobs ...`, `models`,
`webhook-secret`), on undiffuse.client.

Kept apart from the training and sampling commands so that a client command never imports torch.
The client retries what is worth retrying (undiffuse.client); each retry is one line on stderr.
Exit statuses are cli.py's: 0 done, 1 the job did not succeed (or a download failed its
checksums), 2 refused (bad arguments, 4xx), 3 the service is unreachable or unavailable, 4
--timeout ran out, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone

import httpx
from tqdm import tqdm

from undiffuse.client import (
    APIError,
    ChecksumError,
    Client,
    Job,
    JobEvent,
    UnavailableError,
    WaitTimeout,
)

EXIT_OK, EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNAVAILABLE, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


def run(args: argparse.Namespace) -> int:
    command = f"jobs {args.jobs_command}" if args.command == "jobs" else args.command
    _say_retries()
    try:
        with Client(args.url, args.api_key) as api:
            return COMMANDS[command](api, args)
    except KeyboardInterrupt:
        print("undiffuse: interrupted (a submitted job goes on running)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ChecksumError as e:
        return _fail(EXIT_JOB_FAILED, f"download does not match the manifest: {e}")
    except WaitTimeout as e:
        return _fail(EXIT_TIMEOUT, f"{e} (the job goes on: undiffuse jobs wait ID)")
    except UnavailableError as e:
        return _fail(EXIT_UNAVAILABLE, f"{e} (retry later)")
    except APIError as e:
        return _fail(EXIT_UNAVAILABLE if e.status_code >= 500 else EXIT_REFUSED, str(e))
    except httpx.TransportError as e:
        return _fail(EXIT_UNAVAILABLE, f"cannot reach the service: {type(e).__name__}: {e}")
    except OSError as e:
        return _fail(EXIT_REFUSED, str(e))


def _say_retries() -> None:
    """Each retry as a line on stderr. Without this, stamina's default logs it through the
    `stamina` logger, which an unconfigured process prints as a bare "stamina.retry_scheduled"."""
    import stamina.instrumentation

    def say(details: stamina.instrumentation.RetryDetails) -> None:
        cause = details.caused_by
        what = str(cause) if isinstance(cause, APIError) else f"{type(cause).__name__}: {cause}"
        print(f"undiffuse: {what}; retry {details.retry_num} in {details.wait_for:.1f} s", file=sys.stderr)

    stamina.instrumentation.set_on_retry_hooks([say])


def _fail(code: int, message: str) -> int:
    print(f"undiffuse: error: {message}", file=sys.stderr)
    return code


SUBMIT_FIELDS = (
    "model", "steps", "sampler", "eta", "seed", "class_label", "guidance_scale",
    "previews", "preview_every", "webhook_url", "webhook_events", "output_format", "output_quality",
)  # fmt: skip


def _submit(api: Client, args: argparse.Namespace) -> int:
    body = dict(args.body or {})
    given = {name: getattr(args, name) for name in SUBMIT_FIELDS if getattr(args, name) is not None}
    num_images = body.pop("num_images", 1)
    if args.num_images is not None:
        num_images = args.num_images
    job = api.submit(num_images, idempotency_key=args.idempotency_key, **{**body, **given})
    if not (args.wait or args.out):  # --out implies --wait
        _print_job(job, args.json, brief=True)
        return EXIT_OK
    print(f"job {job.id} queued (seed {job.params.get('seed')})", file=sys.stderr)
    return _follow(api, job.id, args)


def _wait(api: Client, args: argparse.Namespace) -> int:
    return _follow(api, args.job_id, args)


def _follow(api: Client, job_id: str, args: argparse.Namespace) -> int:
    """Progress bars for the denoising steps and the images until the job ends; then download
    its images with --out. Exit 0 only if it succeeded (and downloaded cleanly)."""
    bars = _ProgressBars(disabled=args.quiet)
    try:
        job = api.wait(job_id, on_event=bars.update, timeout=args.timeout)
    finally:
        bars.close()
    if job.status != "succeeded":
        reason = f": {job.error['message']}" if job.error else ""
        _print_job(job, args.json, brief=True)
        return _fail(EXIT_JOB_FAILED, f"job {job.id} {job.status}{reason}")
    if args.out:
        _download_to(api, job.id, args.out, quiet=args.quiet)
    _print_job(job, args.json, brief=True)
    return EXIT_OK


def _download(api: Client, args: argparse.Namespace) -> int:
    _download_to(api, args.job_id, args.out, quiet=False)
    return EXIT_OK


def _download_to(api: Client, job_id: str, out, quiet: bool) -> None:
    total = api.get(job_id, results_limit=1).progress.images_total
    with tqdm(total=total, unit="img", desc="download", file=sys.stderr, disable=quiet) as bar:
        result = api.download(job_id, out, on_image=lambda _: bar.update(1))
    check = "checked against manifest.json" if result.verified else "no manifest to check against"
    print(f"wrote {len(result.images)} images to {result.directory} ({check})", file=sys.stderr)


def _list(api: Client, args: argparse.Namespace) -> int:
    page = api.list(status=args.status, limit=args.limit)
    jobs = list(page.jobs)
    while args.all and page.next_cursor:
        page = api.list(status=args.status, limit=args.limit, cursor=page.next_cursor)
        jobs.extend(page.jobs)
    if args.json:
        print(json.dumps([_jsonable(j) for j in jobs], indent=2))
        return EXIT_OK
    for j in jobs:
        created = datetime.fromtimestamp(j.created_at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        done = f"{j.progress.images_done}/{j.progress.images_total}"
        print(f"{j.id}  {j.status:<9}  {done:>9} images  {created} UTC")
    return EXIT_OK


def _get(api: Client, args: argparse.Namespace) -> int:
    _print_job(api.get(args.job_id), args.json, brief=False)
    return EXIT_OK


def _cancel(api: Client, args: argparse.Namespace) -> int:
    _print_job(api.cancel(args.job_id), args.json, brief=True)
    return EXIT_OK


def _delete(api: Client, args: argparse.Namespace) -> int:
    api.delete(args.job_id)
    print(f"deleted job {args.job_id}", file=sys.stderr)
    return EXIT_OK


def _archive(api: Client, args: argparse.Namespace) -> int:
    size = api.archive(args.job_id, args.out)
    print(f"wrote {args.out} ({size:,} bytes)", file=sys.stderr)
    return EXIT_OK


def _models(api: Client, args: argparse.Namespace) -> int:
    models = api.models()
    if args.json:
        print(json.dumps(models, indent=2))
        return EXIT_OK
    for m in models:
        size = f"{m['image_size']}x{m['image_size']}x{m['channels']}"
        classes = f"{m['num_classes']} classes" if m.get("num_classes") else "unconditional"
        default = "  (default)" if m.get("default") else ""
        steps = m.get("max_steps", m["num_timesteps"])
        print(f"{m['name']:<16} {size:<12} {classes:<14} up to {steps} steps{default}")
    return EXIT_OK


def _webhook_secret(api: Client, args: argparse.Namespace) -> int:
    secret = api.webhook_secret()
    print(json.dumps({"secret": secret}) if args.json else secret)
    return EXIT_OK


COMMANDS = {
    "submit": _submit,
    "models": _models,
    "webhook-secret": _webhook_secret,
    "jobs delete": _delete,
    "jobs archive": _archive,
    "jobs list": _list,
    "jobs get": _get,
    "jobs wait": _wait,
    "jobs cancel": _cancel,
    "jobs download": _download,
}


class _ProgressBars:
    """Two tqdm bars on stderr: the denoising steps of the running shards, and images done."""

    def __init__(self, disabled: bool) -> None:
        self.disabled = disabled
        self.steps: tqdm | None = None
        self.images: tqdm | None = None

    def update(self, event: JobEvent) -> None:
        if self.disabled or event.event != "progress":
            return
        p = event.data
        if self.steps is None:
            self.steps = tqdm(total=p["steps"], unit="step", desc="denoising", file=sys.stderr, position=0)
            self.images = tqdm(total=p["images_total"], unit="img", desc="images", file=sys.stderr, position=1)
        # a new shard starts its steps again from 0: the bar follows the current position
        self.steps.n = min(p["step"], p["steps"])
        self.images.n = p["images_done"]
        self.steps.refresh()
        self.images.refresh()

    def close(self) -> None:
        for bar in (self.steps, self.images):
            if bar is not None:
                bar.close()


def _jsonable(value) -> dict:
    from dataclasses import asdict

    return asdict(value)


def _print_job(job: Job, as_json: bool, brief: bool) -> None:
    """stdout: the job id (brief: what a script captures), a readable summary, or its JSON."""
    if as_json:
        print(json.dumps(_jsonable(job), indent=2))
    elif brief:
        print(job.id)
    else:
        p = job.progress
        print(f"id        {job.id}\nstatus    {job.status}")
        print(f"progress  {p.images_done}/{p.images_total} images, step {p.step}/{p.steps}")
        print("params    " + json.dumps(job.params, sort_keys=True))
        if job.error:
            print(f"error     {job.error.get('code')}: {job.error.get('message')}")
        for r in job.results:
            print(f"image {r.index:>5}  seed {r.seed}  {r.url}")
        if job.results_next_offset is not None:
            print(f"(more results: undiffuse jobs download {job.id} --out DIR)")
