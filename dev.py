#!/usr/bin/env python3
"""Set up and run undiffuse on a machine with only Python 3.10+ and pip.

    python3 dev.py up      # create .venv, install, start the whole local stack
    python3 dev.py test    # create .venv, install, run the test suite (extra args go to pytest)
    python3 dev.py test -m fast   # the fast tier: no servers, about a minute (README)
    python3 dev.py setup   # only create/refresh .venv

Standard library only: this script must run before anything is installed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
LOCK = ROOT / "requirements.lock"
STAMP = VENV / ".undiffuse-installed"
PYTHON = VENV / "bin" / "python"


def setup() -> None:
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256(LOCK.read_bytes() + (ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == digest:
        return
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    print("installing dependencies from requirements.lock (torch 2.13.0, CPU build, first)", flush=True)
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "torch==2.13.0"], check=True)  # pinned so a CPU machine never pulls CUDA wheels
    subprocess.run([*pip, "-r", str(LOCK)], check=True)
    subprocess.run([*pip, "--no-deps", "-e", str(ROOT)], check=True)
    fetch_promtool()
    STAMP.write_text(digest)


def fetch_promtool() -> None:
    """promtool (for the Prometheus-config test) from Debian's prometheus package, unpacked into
    .venv/tools without root. Where apt is missing the test says so and is skipped."""
    target = VENV / "tools"
    if shutil.which("promtool") or (target / "usr" / "bin" / "promtool").exists():
        return
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        print("note: no apt-get/dpkg here; the promtool test will be skipped", flush=True)
        return
    with tempfile.TemporaryDirectory() as tmp:
        got = subprocess.run(["apt-get", "download", "prometheus"], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            print(f"note: could not download Debian's prometheus package: {got.stderr.strip()[:200]}", flush=True)
            return
        subprocess.run(["dpkg", "-x", str(debs[0]), str(target)], check=True)


def install_browser() -> None:
    """Chromium and its driver (for the web page's browser tests)."""
    apt_install(("chromium", "chromium-driver"), ("chromium", "chromedriver"), "the browser tests", recommends=False)


def install_podman() -> None:
    """podman, runc, slirp4netns and debootstrap (for the image test, which builds the real
    Dockerfile: tests/deploy/test_image.py); podman's recommends bring its network backend."""
    tools = ("podman", "runc", "slirp4netns", "debootstrap")
    apt_install(tools, tools, "the image test", recommends=True)


def apt_install(packages: tuple[str, ...], commands: tuple[str, ...], purpose: str, recommends: bool) -> None:
    """Debian packages for some tests, where this runs as root with apt, as CI does; elsewhere
    a note, and those tests say so and are skipped. Nothing happens if the commands exist."""
    if all(shutil.which(c) for c in commands):
        return
    if not (shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0):
        print(f"note: {', '.join(packages)} need root and apt-get here; {purpose} will be skipped", flush=True)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", *([] if recommends else ["--no-install-recommends"]), *packages]
    print(f"installing Debian's {', '.join(packages)} for {purpose}", flush=True)
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)  # stale package lists
        got = subprocess.run(install, env=env, capture_output=True, text=True)
        if got.returncode != 0:
            print(f"note: could not install {', '.join(packages)}: {got.stderr.strip()[-300:]}", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("setup", "up", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    setup()
    os.chdir(ROOT)
    if command == "up":
        os.execv(PYTHON, [str(PYTHON), "-m", "service.dev.local", *rest])
    if command == "test":
        install_browser()  # the tests' system packages (each a no-op once its commands exist;
        install_podman()  # `up` needs neither, so a user who only starts the stack never waits for them)
        os.execv(PYTHON, [str(PYTHON), "-m", "pytest", *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
