"""The whole stack on one machine from the command line: `python -m service.dev.local` (what
`python3 dev.py up` and `make up` run; service.dev.stack starts it).

Starts a Redis-compatible server and SeaweedFS's S3 gateway on 127.0.0.1 (state under .run/),
local Ray, and the Serve application serving the demo model on http://127.0.0.1:8000.
Prints the API keys of this run, each with its owner: `--api-key` may be given several times
(`--api-key alice=K1 --api-key bob=K2`) to try per-owner fairness and quotas on one machine;
without it, a new random key of owner "local". Ctrl-C stops all of it.
"""

from __future__ import annotations

import argparse
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from service.api_keys import OWNER, digest
from service.settings import REPO_ROOT

if TYPE_CHECKING:
    from service.dev.stack import LocalStack


def owner_keys(values: list[str] | None) -> list[tuple[str, str]]:
    """(owner, key) of each `--api-key` value, in the order given.

    A value is `OWNER=KEY` (split at the first "=", so a key containing "=" needs its owner) or a
    plain `KEY`, whose owner is "local" if it is the first value and "local-<n>" if the n-th. No
    values: one new random key of owner "local". ValueError (one line, naming the value by its
    position and never echoing a key) for a malformed owner, an empty key or one with whitespace,
    a key given twice, or an owner given twice.
    """
    if not values:
        return [("local", "ud_" + secrets.token_urlsafe(24))]
    pairs: list[tuple[str, str]] = []
    seen_keys: dict[str, int] = {}
    seen_owners: dict[str, int] = {}
    for position, value in enumerate(values, 1):
        owner, equals, key = value.partition("=")
        if not equals:
            owner, key = ("local" if position == 1 else f"local-{position}"), value
        elif not OWNER.fullmatch(owner):
            raise ValueError(f"--api-key {position}: the owner before '=' must match {OWNER.pattern}")
        if not key or any(c.isspace() for c in key):
            raise ValueError(f"--api-key {position}: the key is empty or contains whitespace")
        if key in seen_keys:
            raise ValueError(f"--api-key {position} repeats the key of --api-key {seen_keys[key]}")
        if owner in seen_owners:
            raise ValueError(f"--api-key {position} repeats owner {owner!r} of --api-key {seen_owners[owner]}")
        seen_keys[key], seen_owners[owner] = position, position
        pairs.append((owner, key))
    return pairs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.dev.local", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8000, help="HTTP port of the API")
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus endpoint of Ray's metrics agent")
    p.add_argument("--workdir", type=Path, default=REPO_ROOT / ".run", help="state of Redis and SeaweedFS")
    p.add_argument(
        "--api-key",
        action="append",
        metavar="[OWNER=]KEY",
        help="an API key and its owner; repeat it for several owners (a plain key's owner is local, local-2, ...;"
        " default: a new random key of owner local each start)",
    )
    p.add_argument("--denoiser-replicas", type=int, default=1)
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    try:
        api_keys = owner_keys(args.api_key)
    except ValueError as error:
        p.error(str(error))

    from service.dev.stack import local_stack

    settings = {"api_keys": [f"{owner}=sha256:{digest(key)}" for owner, key in api_keys]}  # hashes only
    with local_stack(
        args.workdir,
        settings,
        port=args.port,
        metrics_port=args.metrics_port,
        denoiser_replicas=args.denoiser_replicas,
        worker_replicas=args.workers,
    ) as stack:
        # Ctrl-C while the stack starts interrupts the start; once it is up, it stops it in order
        # (Serve drains its workers, then Ray, then the servers)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        print(banner(stack, api_keys), flush=True)
        stop.wait()
        print("stopping...", file=sys.stderr, flush=True)
    return 0


def banner(stack: LocalStack, api_keys: list[tuple[str, str]]) -> str:
    base = stack.base_url
    width = max(len(key) for _, key in api_keys)
    key_lines = "\n".join(f"  API key      {key:<{width}}   owner: {owner}" for owner, key in api_keys)
    return f"""
undiffuse is up.
  API          {base}   (OpenAPI docs: {base}/docs)
{key_lines}
  metrics      {stack.metrics_url}   (names start with ray_undiffuse_)
  Redis        {stack.redis.url}
  S3           {stack.s3.endpoint}   bucket: undiffuse

Try:
  export KEY={api_keys[0][1]}
  curl -s -X POST {base}/v1/jobs -H "Authorization: Bearer $KEY" -H 'Content-Type: application/json' \\
       -d '{{"num_images": 4, "class_label": 7, "steps": 50}}'

Ctrl-C stops everything."""


if __name__ == "__main__":
    sys.exit(main())
