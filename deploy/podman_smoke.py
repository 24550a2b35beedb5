"""Build and run the image for real with podman, by hand: what tests/deploy/test_image.py checks,
printed step by step with its timings (docs/deploy.md records them), and --cuda-refusal, which the
suite does not run. The building and running are deploy/podman_image.py's, shared with the test.

    python deploy/podman_smoke.py [--build] [--image localhost/undiffuse-ci:cpu] [--cuda-refusal]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from deploy import podman_image as pi  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--build", action="store_true", help="build the image first (the base with debootstrap if missing)")
    p.add_argument("--image", default=pi.IMAGE)
    p.add_argument("--name", default="undiffuse-smoke")
    p.add_argument(
        "--cuda-refusal",
        action="store_true",
        help="instead of a job: start with UNDIFFUSE_DEVICE=cuda (a CPU image, or no GPU) and expect the Denoiser to refuse",
    )
    args = p.parse_args()
    if not pi.available():
        raise SystemExit(f"this {pi.SKIP_REASON}")

    if args.build:
        started = time.monotonic()
        times = pi.build(args.image)
        print(
            f"built {args.image} in {time.monotonic() - started:.0f} s ("
            + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
            + ")"
        )
    image = pi.inspect_image(args.image)
    print(f"image {args.image}: {image['Size'] / 1e9:.2f} GB, user {image['Config'].get('User')}")
    tools = pi.podman(
        "run", "--rm", "--network", "none", args.image, "sh", "-c", "for c in wget bash grep; do command -v $c; done"
    )
    print("  has wget, bash, grep:", tools.stdout.split())
    took = pi.kuberay_head_probe(args.image, f"{args.name}-probe")
    print(f"  KubeRay's head probe (bash -c 'wget ... | grep success') passes {took:.0f} s after `ray start`")

    extra = {"UNDIFFUSE_DEVICE": "cuda"} if args.cuda_refusal else {}
    with pi.serve(args.image, args.name, extra) as running:
        print("  runs as:", running.exec("id").stdout.strip())
        if args.cuda_refusal:
            return _expect_cuda_refusal(running)
        healthy = pi.wait("the HEALTHCHECK", running.healthy, 300)
        print(f"  HEALTHCHECK healthy {healthy:.0f} s after start")
        pi.wait("/readyz", lambda: pi.status(running.api_url + "/readyz") == 200, 300)
        print(f"  /readyz 200 {time.monotonic() - running.started:.0f} s after start")
        view, took, pngs = pi.run_job(running)
        print(f"  job {view['id']}: {view['status']} in {took:.1f} s, {pi.JOB}")
        if view["status"] != "succeeded":
            raise SystemExit(f"job did not succeed: {view}")
        for key, png in pngs:
            print(f"  {key}: {len(png)} bytes, {pi.png_info(png)}")
    return 0


def _expect_cuda_refusal(running: pi.Running) -> int:
    """The Denoiser must fail at start naming the reason, and the container must exit non-zero."""
    marker = "RuntimeError: UNDIFFUSE_DEVICE=cuda, but"
    pi.wait("the Denoiser's refusal", lambda: marker in running.logs(), 300)
    refusal = next(line for line in running.logs().splitlines() if marker in line)
    print(f"  refused {time.monotonic() - running.started:.0f} s after start: {refusal.split('RuntimeError: ', 1)[1]}")

    def state() -> list[str]:
        return pi.podman("inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", running.name).stdout.split()

    pi.wait("the container to exit", lambda: state()[0] == "exited", 300)
    print(f"  container exited with {state()[1]} {time.monotonic() - running.started:.0f} s after start")
    return 0 if state()[1] != "0" else 1


if __name__ == "__main__":
    sys.exit(main())
