"""`python -m service.dev.local` (what `python3 dev.py up` / `make up` run) as a user starts it:
it comes up, serves a job end to end, and Ctrl-C stops everything it started."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.dev.servers import free_port
from tests.service.conftest import wait_for

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _banner_key(log: Path, proc: subprocess.Popen) -> str | None:
    """The API key from the banner once it is printed; fails at once if the stack exited instead."""
    text = log.read_text()
    if proc.poll() is not None:
        raise AssertionError(f"the stack exited ({proc.returncode}) before its banner:\n{text[-6000:]}")
    return (m := re.search(r"API key\s+(\S+)", text)) and m.group(1)


def test_local_stack_starts_serves_and_stops(tmp_path):
    port, metrics = free_port(), free_port()
    log = tmp_path / "up.log"
    env = {**os.environ, "RAY_ADDRESS": "local"}  # its own Ray, beside the test session's
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.dev.local",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics),
                "--workdir",
                str(tmp_path / "run"),
            ],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        # ~40 s on an idle 2-core VM; CI once took over 240 s beside the session's own stack,
        # so the wait is generous and a timeout shows what the stack printed and the disk left.
        try:
            key = wait_for(lambda: _banner_key(log, proc), 540, 1.0, "the banner")
        except AssertionError as timeout:
            disk = subprocess.run(["df", "-h", "/tmp", "/dev/shm"], capture_output=True, text=True).stdout
            raise AssertionError(f"{timeout}\n{disk}what it printed:\n{log.read_text()[-6000:]}") from None
        api = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}, timeout=30)
        job = api.post("/v1/jobs", json={"num_images": 2, "class_label": 7, "steps": 5}).json()
        done = wait_for(
            lambda: (b := api.get(f"/v1/jobs/{job['id']}").json())["status"] == "succeeded" and b, 120, 0.5, "the job"
        )
        assert httpx.get(done["results"][0]["url"], timeout=10).content[:8] == b"\x89PNG\r\n\x1a\n"
        assert api.get("/v1/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # the README's command line against the stack it printed the key of
        out = tmp_path / "fours"
        cli = subprocess.run(
            [sys.executable, "-m", "undiffuse.cli", "submit", "--num", "3", "--class", "4", "--steps", "5"]
            + ["--wait", "--quiet", "--out", str(out), "--url", f"http://127.0.0.1:{port}", "--api-key", key],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert cli.returncode == 0, cli.stderr
        assert sorted(p.name for p in out.iterdir()) == ["00000.png", "00001.png", "00002.png", "manifest.json"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in out.glob("*.png"))
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, log.read_text()[-3000:]
    time.sleep(1)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
    # the Redis and SeaweedFS it started are gone too
    leftovers = subprocess.run(["pgrep", "-f", str(tmp_path / "run")], capture_output=True, text=True).stdout.split()
    assert leftovers == []
