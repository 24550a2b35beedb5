"""Resource attacks: what one client may take of what every tenant shares (request bodies, slow
uploads, event streams, downloads), tried on a local stack with the application's default limits.
Prints a Markdown table (docs/reliability.md):

    python -m bench.drills.resources
"""

from __future__ import annotations

import re
import socket

KEYS_R = {"alice": "drill-resources-alice", "bob": "drill-resources-bob"}


def _rss(title: bytes) -> int:
    """Resident bytes of the process Ray titled `title` (ServeReplica:undiffuse:Ingress, the
    Ingress replica; ProxyActor, Serve's HTTP proxy)."""
    from pathlib import Path

    for proc in Path("/proc").iterdir():
        try:
            if title in (proc / "cmdline").read_bytes():
                status = (proc / "status").read_text()
                return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
        except (OSError, AttributeError):
            continue
    raise RuntimeError(f"no process titled {title!r}")


def chunked_upload(host: str, port: int, total: int, key: str | None = None) -> tuple[int | None, int]:
    """POST /v1/jobs with a chunked body of `total` bytes, no Content-Length: (status, bytes the
    client got to send before the server answered and closed)."""
    head = [b"POST /v1/jobs HTTP/1.1", f"Host: {host}:{port}".encode(), b"Transfer-Encoding: chunked"]
    head += [b"Content-Type: application/json"] + ([f"Authorization: Bearer {key}".encode()] if key else [])
    chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
    sent = 0
    with socket.create_connection((host, port), timeout=60) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        try:
            while sent < total:
                s.sendall(chunk)
                sent += 1 << 20
            s.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # answered and closed
        raw = b""
        try:
            while data := s.recv(65536):
                raw += data
        except OSError:
            pass
    status = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    return (int(status.group(1)) if status else None), sent


def resource_attacks(base: str, redis_url: str, upload_mib: int = 1024) -> list[tuple[str, str, str]]:
    """(attack, what the service held, 5xx) rows."""
    import threading
    import time
    from urllib.parse import urlsplit

    import httpx
    import redis as redis_lib

    from service.jobs import redis_keys

    host, port = urlsplit(base).hostname, urlsplit(base).port
    db = redis_lib.Redis.from_url(redis_url)
    rows: list[tuple[str, str, str]] = []
    server_errors = 0
    alice = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS_R['alice']}"}, timeout=60)

    def count(*statuses: int | None) -> None:
        nonlocal server_errors
        server_errors += sum(1 for s in statuses if s is None or s >= 500)

    # 1. an unauthenticated chunked upload of 300 MB
    titles = (b"ServeReplica:undiffuse:Ingress", b"ProxyActor")
    before = [_rss(t) for t in titles]
    status, sent = chunked_upload(host, port, upload_mib << 20)
    count(status)
    ingress, proxy = (_rss(t) - b for t, b in zip(titles, before, strict=True))
    rows.append(
        (
            f"unauthenticated chunked POST of {upload_mib} MiB",
            f"{status}; {sent / 2**20:.0f} MiB sent before the answer; RSS Ingress {ingress / 2**20:+.1f} MiB, "
            f"proxy {proxy / 2**20:+.1f} MiB",
            str(int(status is None or status >= 500)),
        )
    )

    # 2. Redis bytes an ended job leaves: 1 image with previews, 256 images
    def job_bytes(body: dict) -> tuple[str, int]:
        job_id = alice.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 600
        while (
            db.hget(redis_keys.job(job_id), "status") not in (b"succeeded", b"failed") and time.monotonic() < deadline
        ):
            time.sleep(0.2)
        return job_id, sum(db.memory_usage(k) or 0 for k in db.scan_iter(f"{redis_keys.job(job_id)}*"))

    done, small = job_bytes({"num_images": 1, "steps": 50, "class_label": 4, "previews": True})
    _, large = job_bytes({"num_images": 256, "steps": 10, "class_label": 4})
    rows.append(
        ("Redis bytes an ended job keeps", f"{small:,} B (1 image, 50 steps, previews); {large:,} B (256 images)", "0")
    )

    # 3. 40 concurrent event streams of one key (cap 16), on a job that runs meanwhile
    job = alice.post("/v1/jobs", json={"num_images": 64, "steps": 1000, "class_label": 3}).json()
    statuses: list[int] = []
    hold = threading.Event()
    lock = threading.Lock()

    def stream() -> None:
        with httpx.Client(base_url=base, headers=alice.headers, timeout=60) as own:
            with own.stream("GET", f"/v1/jobs/{job['id']}/events") as r:
                with lock:
                    statuses.append(r.status_code)
                if r.status_code == 200:
                    hold.wait(60)

    threads = [threading.Thread(target=stream) for _ in range(40)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while len(statuses) < 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    held = db.zcard(redis_keys.owner_slots("alice"))
    archive = alice.get(f"/v1/jobs/{done}/archive")  # a download of a succeeded job takes a slot too
    hold.set()
    for t in threads:
        t.join(60)
    count(*statuses, archive.status_code)
    rows.append(
        (
            "40 concurrent event streams of one key (limit 16)",
            f"{statuses.count(200)} opened, {statuses.count(429)} × 429; slots held in Redis {held}; "
            f"an archive request meanwhile {archive.status_code}",
            str(sum(1 for s in statuses if s >= 500)),
        )
    )
    alice.post(f"/v1/jobs/{job['id']}/cancel")

    # 4. cost in flight: maximum-cost jobs (1,024 images x 128 steps x 2, guided)
    biggest = {"num_images": 1024, "steps": 128, "class_label": 1, "guidance_scale": 2.0}
    answers = [alice.post("/v1/jobs", json=biggest) for _ in range(5)]
    count(*(a.status_code for a in answers))
    for a in answers:
        if a.status_code == 202:
            alice.post(f"/v1/jobs/{a.json()['id']}/cancel")
    rows.append(
        (
            "5 maximum-cost jobs at once (262,144 image-steps each)",
            " / ".join(str(a.status_code) for a in answers),
            str(sum(1 for a in answers if a.status_code >= 500)),
        )
    )

    # 5. polling faster than the read quota (1,200 a minute)
    poll = [alice.get(f"/v1/jobs/{job['id']}").status_code for _ in range(1300)]
    count(*poll)
    rows.append(("1,300 polls of one job in a burst", f"{poll.count(200)} × 200, {poll.count(429)} × 429", "0"))

    # 6. the small ones
    bob = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEYS_R['bob']}"}, timeout=60)
    own = bob.post("/v1/jobs", json={"class_label": 1, "steps": 5}).json()["id"]
    small_cases = {
        "lone surrogate in a string field": bob.post(
            "/v1/jobs", content=b'{"class_label": 1, "model": "\\ud800"}', headers={"Content-Type": "application/json"}
        ),
        "Last-Event-ID 2^64": bob.get(f"/v1/jobs/{own}/events", headers={"Last-Event-ID": f"{2**64}-0"}),
        "a GET with a chunked body": bob.request(
            "GET", "/v1/jobs", content=iter([b"x" * 1024]), headers={"Transfer-Encoding": "chunked"}
        ),
        "webhook to 192.0.0.192": bob.post(
            "/v1/jobs", json={"class_label": 1, "webhook_url": "https://192.0.0.192/hook"}
        ),
        "webhook with user:pass@": bob.post(
            "/v1/jobs", json={"class_label": 1, "webhook_url": "https://user:pass@example.com/hook"}
        ),
        "webhook to port 6379": bob.post(
            "/v1/jobs", json={"class_label": 1, "webhook_url": "https://example.com:6379/"}
        ),
        "/docs (a development stack; production answers 404)": bob.get("/docs"),
    }
    count(*(r.status_code for r in small_cases.values()))
    for name, r in small_cases.items():
        rows.append((name, str(r.status_code), str(int(r.status_code >= 500))))
    rows.append(("all of the above: 5xx", str(server_errors), str(server_errors)))
    return rows


def main() -> None:
    import os
    import platform
    import tempfile
    from datetime import date
    from pathlib import Path

    import ray

    from service.api_keys import digest
    from service.dev.stack import local_stack

    work = Path(tempfile.mkdtemp(prefix="undiffuse-hostile-"))
    settings = {"api_keys": [f"{owner}=sha256:{digest(key)}" for owner, key in KEYS_R.items()]}
    quiet = {"logging_level": "ERROR", "log_to_driver": False}
    with local_stack(work, settings, ray_options=quiet) as stack:
        rows = resource_attacks(stack.base_url, stack.redis.url)
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Ray {ray.__version__}, {date.today()}\n"
    )
    print("| attack | what the service held | 5xx |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
