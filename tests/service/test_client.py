"""undiffuse.client and the `undiffuse submit` / `undiffuse jobs` commands against the real stack
(Ray Serve, Redis, SeaweedFS): typed results, the server's errors as exceptions, waiting on the
event stream, downloads checked against the job's manifest, and the CLI's files and exit codes.
Each client-behaviour test runs on `Client` and on `AsyncClient` (driven by tests.core's
Blocking wrapper), so the two cannot drift apart."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.storage import ObjectStore
from tests.core.test_client_core import open_client
from tests.service.conftest import KEY_A, KEY_B
from undiffuse.client import (
    AsyncClient,
    AuthenticationError,
    ChecksumError,
    ConflictError,
    Job,
    NotFoundError,
    ValidationError,
    WaitTimeout,
)

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(params=["Client", "AsyncClient"])
def connect(request):
    """Opens clients of the kind under test (`connect(url, key)`) and closes them afterwards."""
    opened = []

    def open_one(url: str, key: str = KEY_A):
        opened.append(open_client(request.param, url, key))
        return opened[-1]

    yield open_one
    for c in opened:
        c.close()


@pytest.fixture
def client(connect, stack):
    return connect(stack.base_url)


def test_submit_wait_and_download_checked_against_the_manifest(client, stack, tmp_path):
    job = client.submit(5, class_label=3, steps=6, seed=42)
    assert isinstance(job, Job) and job.status == "queued" and job.params["seed"] == 42

    events = []
    done = client.wait(job.id, on_event=events.append, timeout=120)
    assert done.status == "succeeded" and len(done.results) == 5
    kinds = [e.event for e in events]
    assert kinds[0] == "queued" and kinds.count("succeeded") == 1 and kinds[-1] == "succeeded"
    assert not {"failed", "canceled"} & set(kinds)
    progress = [e.data for e in events if e.event == "progress"]
    assert progress and all(0 <= p["step"] <= p["steps"] == 6 for p in progress)
    assert events[-1].data["status"] == "succeeded" and events[-1].data["progress"]["images_done"] == 5

    result = client.download(job.id, tmp_path / "out")
    assert result.verified and result.manifest and result.manifest.exists()
    manifest = json.loads(result.manifest.read_text())
    assert [p.name for p in result.images] == [f"{i:05d}.png" for i in range(5)]
    s3 = ObjectStore(stack.settings.storage).client
    for entry, path in zip(sorted(manifest["images"], key=lambda e: e["index"]), result.images, strict=True):
        data = path.read_bytes()
        assert data[:8] == PNG
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
        assert s3.get_object(Bucket=stack.settings.s3_bucket, Key=entry["key"])["Body"].read() == data

    # a second download finds every file in place and fetches nothing (the files keep their times)
    mtimes = [p.stat().st_mtime_ns for p in result.images]
    again = client.download(job.id, tmp_path / "out")
    assert [p.stat().st_mtime_ns for p in again.images] == mtimes


def test_a_tampered_image_fails_the_download_and_is_not_written(client, stack, tmp_path):
    job = client.wait(client.submit(2, class_label=1, steps=3).id, timeout=120)
    assert job.status == "succeeded"
    s3 = ObjectStore(stack.settings.storage).client
    s3.put_object(Bucket=stack.settings.s3_bucket, Key=job.results[1].key, Body=PNG + b"not the image")
    with pytest.raises(ChecksumError, match="00001.png"):
        client.download(job.id, tmp_path / "out", concurrency=1)
    assert not (tmp_path / "out" / "00001.png").exists()


def test_the_servers_errors_are_raised_with_its_message(client, connect, stack):
    with pytest.raises(ValidationError) as refused:
        client.submit(100_000, class_label=1)
    assert refused.value.status_code == 422 and "num_images" in refused.value.message

    with pytest.raises(NotFoundError):
        client.get("0" * 32)
    job = client.wait(client.submit(1, class_label=2, steps=2).id, timeout=120)
    with pytest.raises(ConflictError, match="409"):
        client.cancel(job.id)
    with pytest.raises(NotFoundError):
        connect(stack.base_url, KEY_B).get(job.id)  # another owner's job does not exist for Bob
    with pytest.raises(AuthenticationError):
        connect(stack.base_url, "no-such-key").list()


def test_the_async_client_follows_several_jobs_at_once(stack, tmp_path):
    async def main() -> list[tuple[Job, int]]:
        async with AsyncClient(stack.base_url, KEY_A) as api:
            jobs = [await api.submit(2, class_label=c, steps=4) for c in (4, 5)]
            done = await asyncio.gather(*(api.wait(j.id, timeout=120) for j in jobs))
            downloads = await asyncio.gather(*(api.download(j.id, tmp_path / j.id) for j in done))
            return [(j, len(d.images)) for j, d in zip(done, downloads, strict=True) if d.verified]

    finished = asyncio.run(main())
    assert [(j.status, n) for j, n in finished] == [("succeeded", 2), ("succeeded", 2)]


def _cli(*args: str, stack=None, key: str = KEY_A, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "UNDIFFUSE_API_KEY": key}
    if stack is not None:
        env["UNDIFFUSE_URL"] = stack.base_url
    return subprocess.run(
        [sys.executable, "-m", "undiffuse.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_submit_wait_writes_the_images_and_manifest(stack, tmp_path):
    out = tmp_path / "digits"
    proc = _cli("submit", "--num", "3", "--class", "7", "--steps", "5", "--wait", "--out", str(out), stack=stack)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()  # the one line a script captures
    assert len(job_id) == 32
    pngs = sorted(out.glob("*.png"))
    assert [p.name for p in pngs] == ["00000.png", "00001.png", "00002.png"]
    assert all(p.read_bytes()[:8] == PNG for p in pngs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["job_id"] == job_id and len(manifest["images"]) == 3
    assert "checked against manifest.json" in proc.stderr

    listed = _cli("jobs", "list", "--json", "--limit", "5", stack=stack)
    assert listed.returncode == 0 and job_id in [j["id"] for j in json.loads(listed.stdout)]
    shown = _cli("jobs", "get", job_id, stack=stack)
    assert shown.returncode == 0 and "succeeded" in shown.stdout and "00002.png" in shown.stdout


def test_cli_exit_codes_and_one_line_errors(stack, tmp_path):
    refused = _cli("submit", "--num", "100000", "--class", "1", stack=stack)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "num_images" in refused.stderr

    missing = _cli("jobs", "get", "0" * 32, stack=stack)
    assert missing.returncode == 2 and missing.stderr.startswith("undiffuse: error: HTTP 404")

    canceled = _cli("submit", "--num", "8", "--class", "1", "--steps", "400", stack=stack)
    job_id = canceled.stdout.strip()
    assert _cli("jobs", "cancel", job_id, stack=stack).returncode == 0
    waited = _cli("jobs", "wait", job_id, "--quiet", stack=stack)
    assert waited.returncode == 1 and "canceled" in waited.stderr

    unreachable = _cli("jobs", "list", "--url", "http://127.0.0.1:9", timeout=60)
    assert unreachable.returncode == 3 and "cannot reach the service" in unreachable.stderr

    bad_args = _cli("submit", "--num", "0")
    assert bad_args.returncode == 2 and "--num must be >= 1" in bad_args.stderr


class _CuttingProxy:
    """A TCP proxy to the stack that cuts the first event stream after its first events, as a
    dropped connection would; it records each request's head to see how the client came back."""

    def __init__(self, upstream_port: int) -> None:
        import socket
        import threading

        self.upstream_port = upstream_port
        self.requests: list[str] = []
        self.cut = False
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client) -> None:
        import socket
        import threading

        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))

        def pump_up() -> None:  # requests (several per connection: httpx keeps connections alive)
            try:
                while data := client.recv(65536):
                    self.requests.append(data.decode("latin-1"))
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=pump_up, daemon=True).start()
        seen = b""
        try:
            while data := upstream.recv(65536):
                client.sendall(data)
                seen += data
                stream = seen[seen.rfind(b"HTTP/1.1 ") :]  # the response now being relayed
                if not self.cut and b"text/event-stream" in stream and stream.count(b"\nid:") >= 2:
                    self.cut = True
                    break  # drop the connection mid-stream
        except OSError:
            pass
        finally:
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def close(self) -> None:
        self.server.close()


def test_a_dropped_event_stream_is_resumed_with_last_event_id(stack, connect):
    proxy = _CuttingProxy(int(stack.base_url.rsplit(":", 1)[1]))
    try:
        api = connect(f"http://127.0.0.1:{proxy.port}")
        job = api.submit(4, class_label=6, steps=40)
        events = list(api.events(job.id))
    finally:
        proxy.close()
    assert proxy.cut, "the proxy never cut a stream"
    streams = [r for r in proxy.requests if r.split("\r\n", 1)[0].startswith(f"GET /v1/jobs/{job.id}/events")]
    assert len(streams) >= 2
    resumed = [line for line in streams[1].split("\r\n") if line.lower().startswith("last-event-id:")]
    assert resumed, "the client reconnected without Last-Event-ID"
    ids = [e.id for e in events]
    assert resumed[0].split(":", 1)[1].strip() in ids  # it resumed after an event it had seen
    assert len(ids) == len(set(ids)), "an event was delivered twice"
    assert [e.event for e in events].count("succeeded") == 1 and events[-1].event == "succeeded"


@pytest.mark.timeout(90)
def test_keep_alives_are_no_events_and_wait_gives_up_on_time(live_api, connect, monkeypatch):
    """A job that waits in the queue (database 6: no Worker runs it) sends `queued` and then only
    keep-alive comments. They reach no one as events (httpx-sse's iter_sse makes each an empty
    `message` event), and `wait(timeout=)` gives up on time whether the deadline falls on a
    comment or between two."""
    import time

    from service.api import jobs

    monkeypatch.setattr(jobs, "KEEPALIVE_S", 1)  # a comment every second
    api = connect(live_api)
    job = api.submit(1, class_label=0, steps=2)
    seen = []
    started = time.monotonic()
    with pytest.raises(WaitTimeout, match="did not finish within 3 s"):
        api.wait(job.id, on_event=seen.append, timeout=3)
    assert time.monotonic() - started < 6
    assert [e.event for e in seen] == ["queued"] and seen[0].data["id"] == job.id

    monkeypatch.setattr(jobs, "KEEPALIVE_S", 15)  # the default: the deadline falls between two comments
    started = time.monotonic()
    with pytest.raises(WaitTimeout):
        api.wait(job.id, timeout=2)
    assert time.monotonic() - started < 5
    assert api.get(job.id).status == "queued"  # giving up left the job alone


@pytest.mark.timeout(90)
def test_cli_jobs_wait_timeout_exits_4(live_api):
    import time

    with open_client("Client", live_api, KEY_A) as api:
        job = api.submit(1, class_label=0, steps=2)  # database 6: it stays queued
    env = {**os.environ, "UNDIFFUSE_API_KEY": KEY_A, "UNDIFFUSE_URL": live_api}
    started = time.monotonic()
    waited = subprocess.run(
        [sys.executable, "-m", "undiffuse.cli", "jobs", "wait", job.id, "--timeout", "3", "--quiet"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert waited.returncode == 4 and "did not finish within 3 s" in waited.stderr, waited.stderr  # not 3: unavailable
    assert time.monotonic() - started < 20


def test_cli_options_before_the_command_models_secret_archive_and_delete(stack, tmp_path):
    """`undiffuse --url X <command>` works as the tools people know do; models, the webhook
    secret, a job's ZIP and its deletion have commands."""
    import zipfile

    env_url = stack.base_url
    models = _cli("--url", env_url, "models", "--json")
    assert models.returncode == 0, models.stderr
    assert [m["name"] for m in json.loads(models.stdout)] == ["faces", "mnist"]  # the stack's models
    listed = _cli("models", stack=stack).stdout
    assert "mnist" in listed and "faces" in listed
    secret = _cli("webhook-secret", stack=stack)
    assert secret.returncode == 0 and secret.stdout.strip().startswith("whsec_"), secret.stderr
    body = tmp_path / "job.json"
    body.write_text(json.dumps({"num_images": 2, "class_label": 5, "steps": 3}))
    submitted = _cli(
        "submit", "--body", f"@{body}", "--idempotency-key", "cli-body-1", "--wait", "--quiet", stack=stack
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    again = _cli("submit", "--body", f"@{body}", "--idempotency-key", "cli-body-1", stack=stack)
    assert again.stdout.strip() == job_id  # the same job
    archive = tmp_path / "job.zip"
    got = _cli("jobs", "archive", job_id, "--out", str(archive), stack=stack)
    assert got.returncode == 0, got.stderr
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["00000.png", "00001.png", "manifest.json"]
    assert not (tmp_path / "job.zip.part").exists()
    assert _cli("jobs", "delete", job_id, stack=stack).returncode == 0
    gone = _cli("jobs", "get", job_id, stack=stack)
    assert gone.returncode == 2 and "job not found" in gone.stderr
    for _ in range(2):
        assert _cli("submit", "--class", "1", "--steps", "2", stack=stack).returncode == 0
    listed = _cli("jobs", "list", "--limit", "1", "--all", "--json", stack=stack)
    assert listed.returncode == 0 and len(json.loads(listed.stdout)) >= 2  # more than one page of 1


def test_cli_submits_jpeg_and_downloads_jpg_files(stack, tmp_path):
    out = tmp_path / "jpegs"
    done = _cli(
        "submit", "--class", "4", "--num", "2", "--steps", "3", "--format", "jpeg", "--quality", "70",
        "--out", str(out), "--quiet", stack=stack,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["00000.jpg", "00001.jpg", "manifest.json"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["params"]["output_format"], manifest["params"]["output_quality"]) == ("jpeg", 70)
    assert (out / "00000.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # a JPEG
