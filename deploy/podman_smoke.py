"""Run the built image for real with podman: the container against a local Redis-compatible
server and SeaweedFS (started here, as the tests start them), its HEALTHCHECK and /readyz, one job
through the API and its PNG downloaded through the presigned URL. Not part of the test suite (a
build takes minutes): docs/deploy.md says how the image was built and what this printed.

    python deploy/podman_smoke.py [--image localhost/undiffuse:cpu] [--podman "podman --runtime runc"]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from service.dev.servers import RedisServer, S3Server  # noqa: E402


def sh(podman: list[str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([*podman, *args], capture_output=True, text=True, check=check)


def wait(what: str, predicate, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(1)
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default="localhost/undiffuse:cpu")
    p.add_argument("--podman", default="podman --runtime runc")
    p.add_argument("--name", default="undiffuse-smoke")
    p.add_argument(
        "--cuda-refusal",
        action="store_true",
        help="instead of a job: start with UNDIFFUSE_DEVICE=cuda (a CPU image, or no GPU) and expect the Denoiser to refuse",
    )
    args = p.parse_args()
    podman = shlex.split(args.podman)

    key = "ud_" + secrets.token_hex(24)
    s3_key, s3_secret = "smoke", secrets.token_hex(16)
    image = sh(podman, "image", "inspect", args.image).stdout
    config = json.loads(image)[0]["Config"]
    print(f"image {args.image}: {json.loads(image)[0]['Size'] / 1e9:.2f} GB, user {config.get('User')}")
    print(
        "  has wget, bash, grep:",
        sh(
            podman, "run", "--rm", args.image, "sh", "-c", "for c in wget bash grep; do command -v $c; done"
        ).stdout.split(),
    )

    _kuberay_probe(podman, args.image, f"{args.name}-probe")

    with tempfile.TemporaryDirectory() as work, RedisServer(Path(work) / "redis").start() as redis:
        with S3Server(Path(work) / "s3", access_key=s3_key, secret_key=s3_secret).start() as s3:
            env = {
                "UNDIFFUSE_ENVIRONMENT": "production",
                "UNDIFFUSE_API_KEYS": f"smoke=sha256:{hashlib.sha256(key.encode()).hexdigest()}",
                "UNDIFFUSE_REDIS_URL": redis.url,
                "UNDIFFUSE_S3_ENDPOINT_URL": s3.endpoint,
                "UNDIFFUSE_S3_BUCKET": "undiffuse-smoke",
                "UNDIFFUSE_S3_ACCESS_KEY_ID": s3_key,
                "UNDIFFUSE_S3_SECRET_ACCESS_KEY": s3_secret,
            }
            if args.cuda_refusal:
                env["UNDIFFUSE_DEVICE"] = "cuda"
            sh(podman, "rm", "-f", args.name, check=False)
            started = time.monotonic()
            run = ["run", "-d", "--name", args.name, "--network", "host", "--shm-size", "2g"]
            for k, v in env.items():
                run += ["-e", f"{k}={v}"]
            sh(podman, *run, args.image)
            try:
                print("  runs as:", sh(podman, "exec", args.name, "id").stdout.strip())
                if args.cuda_refusal:
                    return _expect_cuda_refusal(podman, args.name, started)
                healthy = wait(
                    "the HEALTHCHECK",
                    lambda: sh(podman, "healthcheck", "run", args.name, check=False).returncode == 0,
                    300,
                )
                print(f"  HEALTHCHECK healthy {healthy:.0f} s after start")
                api = httpx.Client(
                    base_url="http://127.0.0.1:8000", headers={"Authorization": f"Bearer {key}"}, timeout=30
                )
                ready = wait("/readyz", lambda: _status(api, "/readyz") == 200, 300)
                print(f"  /readyz 200 {time.monotonic() - started:.0f} s after start ({ready:.0f} s after healthy)")
                body = {"num_images": 2, "class_label": 7, "steps": 20, "sampler": "ddim", "seed": 1234}
                t0 = time.monotonic()
                job = api.post("/v1/jobs", json=body).raise_for_status().json()
                view = {}

                def done() -> bool:
                    nonlocal view
                    view = api.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
                    return view["status"] in ("succeeded", "failed", "canceled")

                wait("the job", done, 300)
                print(f"  job {job['id']}: {view['status']} in {time.monotonic() - t0:.1f} s, {body}")
                if view["status"] != "succeeded":
                    raise SystemExit(f"job did not succeed: {view}")
                for result in view["results"]:
                    png = httpx.get(result["url"], timeout=30).raise_for_status().content
                    img = Image.open(io.BytesIO(png))
                    print(f"  {result['key']}: {len(png)} bytes, PNG {img.size[0]}x{img.size[1]} {img.mode}")
            finally:
                logs = sh(podman, "logs", args.name, check=False)
                Path(tempfile.gettempdir(), f"{args.name}.log").write_text(logs.stdout + logs.stderr)
                sh(podman, "rm", "-f", "-t", "30", args.name, check=False)
    return 0


# KubeRay's exec readiness/liveness probe of a head pod (ray-operator/controllers/ray/common/pod.go:
# BaseWgetHealthCommand for the dashboard agent's raylet check and the dashboard's GCS check)
KUBERAY_HEAD_PROBE = (
    "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
    " && wget --tries 1 -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
)


def _kuberay_probe(podman: list[str], image: str, name: str) -> None:
    """Start the image as KubeRay starts a head (`ray start --head --block`) and run KubeRay's
    probe command in it, as the kubelet would."""
    sh(podman, "rm", "-f", name, check=False)
    started = time.monotonic()
    sh(podman, "run", "-d", "--name", name, "--shm-size", "1g", image, "bash", "-c",
       "ray start --head --dashboard-host=0.0.0.0 --num-cpus=1 --block")  # fmt: skip
    try:
        probe = lambda: sh(podman, "exec", name, "bash", "-c", KUBERAY_HEAD_PROBE, check=False).returncode == 0  # noqa: E731
        wait("KubeRay's head probe", probe, 180)
        print(
            f"  KubeRay's head probe (bash -c 'wget ... | grep success') passes {time.monotonic() - started:.0f} s after `ray start`"
        )
    finally:
        sh(podman, "rm", "-f", "-t", "5", name, check=False)


def _expect_cuda_refusal(podman: list[str], name: str, started: float) -> int:
    """The Denoiser must fail at start naming the reason, and the container must exit non-zero."""

    def logs() -> str:
        out = sh(podman, "logs", name, check=False)
        return out.stdout + out.stderr

    wait("the Denoiser's refusal", lambda: "RuntimeError: UNDIFFUSE_DEVICE=cuda, but" in logs(), 300)
    refusal = next(line for line in logs().splitlines() if "RuntimeError: UNDIFFUSE_DEVICE=cuda, but" in line)
    print(f"  refused {time.monotonic() - started:.0f} s after start: {refusal.split('RuntimeError: ', 1)[1]}")
    state = lambda: sh(podman, "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}", name).stdout.split()  # noqa: E731
    wait("the container to exit", lambda: state()[0] == "exited", 300)
    print(f"  container exited with {state()[1]} {time.monotonic() - started:.0f} s after start")
    return 0 if state()[1] != "0" else 1


def _status(api: httpx.Client, path: str) -> int:
    try:
        return api.get(path).status_code
    except httpx.HTTPError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
