"""Build the real Dockerfile's CPU variant with podman on a machine without a container registry,
and run it against local servers: the one implementation behind tests/deploy/test_image.py and
deploy/podman_smoke.py (docs/deploy.md, "Built and run for real").

- podman reads deploy/containers.conf (CONTAINERS_CONF: runc, no default rlimits, no systemd),
  nothing in /etc changes;
- the base image (the Dockerfile's BASE_IMAGE) is a Debian 12 minbase root made with debootstrap
  and the official image's apt sources, imported once as BASE_IMAGE and kept in podman's store;
- torch's CPU wheel comes from this machine's pip sources (`pip download`), as a one-package
  index in CACHE, bind-mounted read-only at /mnt for the build (TORCH_INDEX_URL=file:///mnt/);
- PyPI is reached as this machine reaches it: its CA bundle (and index-url, if pip has one) in a
  pip.conf under a folder bind-mounted read-only over /root for the build. Both mounts cover
  folders the base already has, so the build leaves no mount points in a layer.

Needs root (debootstrap, rootful podman) and Debian's podman, runc, slirp4netns and debootstrap,
which dev.py installs where it runs as root with apt-get.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTAINERS_CONF = ROOT / "deploy" / "containers.conf"
CACHE = Path(os.environ.get("UNDIFFUSE_IMAGE_CACHE", "/var/tmp/undiffuse-ci"))
BASE_IMAGE = "localhost/undiffuse-ci/debian:bookworm-minbase"
IMAGE = "localhost/undiffuse-ci:cpu"
TORCH = "2.13.0"
TOOLS = ("podman", "runc", "slirp4netns", "debootstrap")
SKIP_REASON = "needs root and Debian's podman, runc, slirp4netns and debootstrap (dev.py installs them as root)"
# the official debian:bookworm-slim image's apt sources
DEBIAN_SOURCES = """\
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""
# KubeRay's exec readiness/liveness probe of a head pod (ray-operator/controllers/ray/common/pod.go:
# BaseWgetHealthCommand for the dashboard agent's raylet check and the dashboard's GCS check)
KUBERAY_HEAD_PROBE = (
    "wget --tries 1 -T 2 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
    " && wget --tries 1 -T 2 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
)
# the address of the host's loopback inside a container on slirp4netns:allow_host_loopback=true
HOST_LOOPBACK = "10.0.2.2"


def available() -> bool:
    return all(shutil.which(t) for t in TOOLS) and hasattr(os, "geteuid") and os.geteuid() == 0


def podman(*args: str, check: bool = True, timeout: float | None = None, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}
    kw.setdefault("capture_output", True)
    return subprocess.run(["podman", *args], env=env, text=True, check=check, timeout=timeout, **kw)


def wait(what: str, predicate: Callable[[], bool], timeout: float, interval: float = 1.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)
    return time.monotonic() - start


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def image_id(name: str) -> str | None:
    got = podman("image", "inspect", "--format", "{{.Id}}", name, check=False)
    return got.stdout.strip() or None


def ensure_base(log: Callable[[str], None] = print) -> float:
    """BASE_IMAGE from debootstrap, unless podman's store has it; the seconds it took (0: cached)."""
    if image_exists(BASE_IMAGE):
        return 0.0
    started = time.monotonic()
    CACHE.mkdir(parents=True, exist_ok=True)
    rootfs = CACHE / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    log(f"debootstrap: a Debian 12 minbase root for {BASE_IMAGE}")
    with open(CACHE / "debootstrap.log", "w") as out:
        subprocess.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), "http://deb.debian.org/debian"],
            stdout=out,
            stderr=subprocess.STDOUT,
            check=True,
        )
    try:
        (rootfs / "etc/apt/sources.list").unlink(missing_ok=True)
        (rootfs / "etc/apt/sources.list.d/debian.sources").write_text(DEBIAN_SOURCES)
        for leftover in (rootfs / "var/lib/apt/lists").glob("*_*"):
            leftover.unlink()
        for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "--change", 'CMD ["bash"]', "-", BASE_IMAGE, stdin=tar.stdout)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap root failed")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)
    return time.monotonic() - started


def torch_index(log: Callable[[str], None] = print) -> Path:
    """A one-package index (CACHE/torch-index/torch/index.html) with torch's CPU wheel for
    CPython 3.11, from wherever this machine's pip finds it (its find-links, a mirror, PyPI)."""
    index = CACHE / "torch-index"
    project = index / "torch"
    wheels = sorted(project.glob(f"torch-{TORCH}+cpu-cp311-*.whl"))
    if not wheels:
        project.mkdir(parents=True, exist_ok=True)
        log(f"pip download torch=={TORCH}+cpu (CPython 3.11) into {project}")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
             "--python-version", "3.11", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
             "-d", str(project), f"torch=={TORCH}+cpu"],
            check=True,
        )  # fmt: skip
        wheels = sorted(project.glob(f"torch-{TORCH}+cpu-cp311-*.whl"))
    links = "".join(f'<a href="{w.name.replace("+", "%2B")}">{w.name}</a>\n' for w in wheels)
    (project / "index.html").write_text(f"<!DOCTYPE html>\n<html><body>\n{links}</body></html>\n")
    return index


def _pip_setting(name: str) -> str | None:
    got = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"], capture_output=True, text=True
    )
    return got.stdout.strip() or None if got.returncode == 0 else None


def build_home() -> Path:
    """CACHE/build-home, mounted over /root during the build: .config/pip/pip.conf naming this
    machine's CA bundle (copied next to it) and, if pip here has one, its http(s) index."""
    home = CACHE / "build-home"
    shutil.rmtree(home, ignore_errors=True)
    (home / ".config" / "pip").mkdir(parents=True)
    lines = ["[global]"]
    candidates = [os.environ.get("PIP_CERT"), _pip_setting("cert"), os.environ.get("SSL_CERT_FILE")]
    ca = next((Path(c) for c in [*candidates, "/etc/ssl/certs/ca-certificates.crt"] if c and Path(c).is_file()), None)
    if ca:
        shutil.copyfile(ca, home / "ca.crt")
        lines.append("cert = /root/ca.crt")
    index = os.environ.get("PIP_INDEX_URL") or _pip_setting("index-url")
    if index and index.startswith(("http://", "https://")):
        lines.append(f"index-url = {index}")
    (home / ".config" / "pip" / "pip.conf").write_text("\n".join(lines) + "\n")
    return home


def build(tag: str = IMAGE, log: Callable[[str], None] = print) -> dict:
    """The base (debootstrap, if missing), the torch index, then `podman build` of the real
    Dockerfile, CPU variant. Returns the seconds each took; the build log is CACHE/build.log.
    The image the tag named before is removed if the build replaced it (no pile-up of 1.5 GB
    images on a machine that runs this often)."""
    times = {"base_s": ensure_base(log)}
    started = time.monotonic()
    index = torch_index(log)
    home = build_home()
    times["torch_index_s"] = time.monotonic() - started
    before = image_id(tag)
    started = time.monotonic()
    log(f"podman build {tag} (CPU variant; log: {CACHE / 'build.log'})")
    with open(CACHE / "build.log", "w") as out:
        got = podman(
            "build", "--format", "docker", "--pull=never", "--network", "host", "--layers",
            "--volume", f"{index}:/mnt:ro", "--volume", f"{home}:/root:ro",
            "--build-arg", "VARIANT=cpu", "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", "TORCH_INDEX_URL=file:///mnt/",
            "--file", str(ROOT / "Dockerfile"), "--tag", tag, str(ROOT),
            check=False, capture_output=False, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    times["build_s"] = time.monotonic() - started
    if got.returncode != 0:
        tail = (CACHE / "build.log").read_text()[-3000:]
        raise RuntimeError(f"podman build failed ({got.returncode}):\n{tail}")
    after = image_id(tag)
    if before and before != after:
        podman("rmi", before, check=False)
    return times


def inspect_image(tag: str = IMAGE) -> dict:
    return json.loads(podman("image", "inspect", tag).stdout)[0]


def kuberay_head_probe(image: str, name: str, timeout: float = 240) -> float:
    """Start the image as KubeRay starts a head (`ray start --head --block`) and run KubeRay's
    probe command in it, as the kubelet would; the seconds until it passed."""
    podman("rm", "-f", name, check=False)
    started = time.monotonic()
    podman("run", "-d", "--name", name, "--network", "slirp4netns", "--shm-size", "1g", image, "bash", "-c",
           "ray start --head --dashboard-host=0.0.0.0 --num-cpus=1 --block")  # fmt: skip
    try:
        probe = lambda: podman("exec", name, "bash", "-c", KUBERAY_HEAD_PROBE, check=False).returncode == 0  # noqa: E731
        wait("KubeRay's head probe", probe, timeout, interval=2)
        return time.monotonic() - started
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)


@dataclass
class Running:
    """The service's container, started against local servers."""

    name: str
    api_url: str
    key: str
    started: float

    def logs(self) -> str:
        got = podman("logs", self.name, check=False)
        return got.stdout + got.stderr

    def healthy(self) -> bool:
        return podman("healthcheck", "run", self.name, check=False).returncode == 0

    def exec(self, *argv: str) -> subprocess.CompletedProcess:
        return podman("exec", self.name, *argv, check=False)


@contextlib.contextmanager
def serve(image: str, name: str, extra_env: dict[str, str] | None = None) -> Iterator[Running]:
    """A Redis-compatible server and SeaweedFS on this machine's loopback (the classes the tests
    use), and the image's default command in a container on slirp4netns that reaches them at
    HOST_LOOPBACK, with the API published on a free loopback port: production mode, a hashed
    API key, the image's own user. The container is removed on the way out, whatever happened."""
    sys.path.insert(0, str(ROOT))
    from service.dev.servers import free_port
    from service.dev.stack import local_servers

    key = "ud_" + secrets.token_hex(24)
    s3_key, s3_secret = "podman", secrets.token_hex(16)
    with tempfile.TemporaryDirectory() as work, local_servers(Path(work), (s3_key, s3_secret)) as servers:
        redis, s3 = servers.redis, servers.s3
        env = {
            "UNDIFFUSE_ENVIRONMENT": "production",
            "UNDIFFUSE_API_KEYS": f"podman=sha256:{hashlib.sha256(key.encode()).hexdigest()}",
            "UNDIFFUSE_REDIS_URL": f"redis://{HOST_LOOPBACK}:{redis.port}/0",
            "UNDIFFUSE_S3_ENDPOINT_URL": f"http://{HOST_LOOPBACK}:{s3.port}",
            "UNDIFFUSE_S3_PUBLIC_ENDPOINT_URL": s3.endpoint,  # presigned for this machine
            "UNDIFFUSE_S3_BUCKET": "undiffuse-podman",
            "UNDIFFUSE_S3_ACCESS_KEY_ID": s3_key,
            "UNDIFFUSE_S3_SECRET_ACCESS_KEY": s3_secret,
            **(extra_env or {}),
        }
        port = free_port()
        podman("rm", "-f", name, check=False)
        run = ["run", "-d", "--name", name, "--shm-size", "2g", "-p", f"127.0.0.1:{port}:8000",
               "--network", "slirp4netns:allow_host_loopback=true"]  # fmt: skip
        for k, v in env.items():
            run += ["-e", f"{k}={v}"]
        started = time.monotonic()
        podman(*run, image)
        running = Running(name=name, api_url=f"http://127.0.0.1:{port}", key=key, started=started)
        try:
            yield running
        finally:
            with contextlib.suppress(Exception):
                (CACHE / f"{name}.log").write_text(running.logs())
            podman("rm", "-f", "-t", "10", name, check=False)


JOB = {"num_images": 2, "class_label": 7, "steps": 20, "sampler": "ddim", "seed": 1234}


def run_job(running: Running, timeout: float = 300) -> tuple[dict, float, list[tuple[str, bytes]]]:
    """Submit JOB through the API, wait for it, download each result through its presigned URL:
    (the job's view, seconds to finish, [(key, PNG bytes)])."""
    import httpx

    api = httpx.Client(base_url=running.api_url, headers={"Authorization": f"Bearer {running.key}"}, timeout=30)
    t0 = time.monotonic()
    job = api.post("/v1/jobs", json=JOB).raise_for_status().json()
    view: dict = {}

    def done() -> bool:
        nonlocal view
        view = api.get(f"/v1/jobs/{job['id']}").raise_for_status().json()
        return view["status"] in ("succeeded", "failed", "canceled")

    wait("the job", done, timeout, interval=0.5)
    took = time.monotonic() - t0
    pngs = []
    if view["status"] == "succeeded":
        for result in view["results"]:
            pngs.append((result["key"], httpx.get(result["url"], timeout=30).raise_for_status().content))
    return view, took, pngs


def status(url: str) -> int:
    import httpx

    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return 0


def png_info(png: bytes) -> str:
    from PIL import Image

    img = Image.open(io.BytesIO(png))
    img.load()
    return f"PNG {img.size[0]}x{img.size[1]} {img.mode}"
