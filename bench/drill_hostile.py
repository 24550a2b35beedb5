"""Phase 4 of bench/drills.py: 100 hostile requests, sent byte for byte over a raw socket (no
client library normalises a path, drops a header or re-encodes a body on their way).

A correct service answers each with a 4xx (a few odd-but-valid forms with a 2xx), never a 5xx,
and never shows one key another key's job: every answer to key B is searched for key A's job
ids and the other way round, and a request for another key's job must be answered 404.
"""

from __future__ import annotations

import json
import re
import socket
from dataclasses import dataclass, field

# a body that is valid in every respect but the field under test
VALID = {"num_images": 1, "steps": 5, "sampler": "ddim", "class_label": 1}
HEX_ID = re.compile(rb"[0-9a-f]{32}")


@dataclass(frozen=True)
class Case:
    name: str
    method: str
    target: str  # the request target, sent as is
    key: str | None = "A"  # whose Bearer key, or None for no Authorization header
    auth: str | None = None  # a raw Authorization value instead of "Bearer <key>"
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()
    expect: frozenset[int] = frozenset({422})
    probe: bool = False  # asks for another key's job: anything but 401/404/405 is a cross-key read
    chunked: bool = False


@dataclass
class Answer:
    case: Case
    status: int | None  # None: no HTTP answer (connection closed or reset)
    error: str | None = None
    cross_key: bool = False
    location: str | None = None  # of a redirect
    body: bytes = field(default=b"", repr=False)

    @property
    def expected(self) -> bool:
        return self.status in self.case.expect


def _post(name: str, raw: bytes | str | dict, expect=frozenset({422}), **kw) -> Case:
    body = raw if isinstance(raw, bytes) else (raw if isinstance(raw, str) else json.dumps(raw)).encode()
    return Case(name, "POST", "/v1/jobs", body=body, expect=frozenset(expect), **kw)


def _with(**fields) -> str:
    """VALID with fields replaced, each value written as raw JSON text (so NaN can be written)."""
    merged = {k: json.dumps(v) for k, v in VALID.items()} | {k: str(v) for k, v in fields.items()}
    return "{" + ", ".join(f'"{k}": {v}' for k, v in merged.items()) + "}"


def malformed() -> list[Case]:
    bad = {400, 422}
    return [
        _post("json: unclosed brace", "{", bad),
        _post("json: trailing comma", '{"num_images": 1,}', bad),
        _post("json: not json", "not json", bad),
        _post("json: empty body", b"", bad),
        _post("json: array", "[]", bad),
        _post("json: null", "null", bad),
        _post("json: trailing garbage", _with() + " garbage", bad),
        _post("json: invalid UTF-8", b'\xff\xfe{"num_images": 1}', bad),
        _post("json: 20,000-deep nesting", "[" * 20000 + "]" * 20000, bad),
        _post("json: a 5,000-digit integer", '{"num_images": 1' + "0" * 5000 + "}", bad),
        _post("json: byte-order mark", b"\xef\xbb\xbf" + _with(class_label=99).encode(), bad),
        _post(
            "json: form-encoded",
            b"num_images=1&class_label=1",
            bad | {415},
            headers=(("Content-Type", "application/x-www-form-urlencoded"),),
        ),
    ]


def non_finite() -> list[Case]:
    return [
        _post(f"NaN/Inf: {field_} = {value}", _with(**{field_: value}))
        for field_, value in [
            ("eta", "NaN"),
            ("eta", "Infinity"),
            ("eta", "-Infinity"),
            ("eta", "1e400"),
            ("guidance_scale", "NaN"),
            ("guidance_scale", "Infinity"),
            ("num_images", "NaN"),
            ("steps", "Infinity"),
            ("seed", "NaN"),
            ("class_label", "NaN"),
        ]
    ]


def out_of_range() -> list[Case]:
    return [
        _post(f"range: {field_} = {value[:40]}", _with(**{field_: value}))
        for field_, value in [
            ("num_images", str(10**30)),
            ("steps", str(10**30)),
            ("seed", str(2**64)),
            ("seed", "-1"),
            ("class_label", "10"),
            ("num_images", "0"),
            ("num_images", "1e308"),
            ("num_images", "1025"),
            ("steps", "1001"),
            ("guidance_scale", "31"),
        ]
    ] + [_post("range: cost 1024 images x 1000 steps", _with(num_images=1024, steps=1000))]


def wrong_types() -> list[Case]:
    return [
        _post(f"type: {field_} = {value[:40]}", _with(**{field_: value}))
        for field_, value in [
            ("num_images", "4.5"),
            ("num_images", '"four"'),
            ("num_images", '{"$gt": 0}'),
            ("sampler", "5"),
            ("sampler", '"euler"'),
            ("model", '"../../etc/passwd"'),
            ("class_label", '"7"'),
            ("class_label", "true"),
            ("class_label", "[true]"),
            ("class_label", "7.0"),
            ("class_label", "null"),
            ("seed", "1.5"),
            ("unknown_field", "1"),
        ]
    ] + [
        _post("type: 2 labels for 3 images", _with(num_images=3, class_label="[1, 2]")),
        _post("type: class_label missing", '{"num_images": 1, "steps": 5}'),
    ]


def paths(a: str, b: str) -> list[Case]:
    nf = frozenset({404})
    return [
        # Starlette redirects ".../" to the path without the slash, here /v1/jobs/.. (a 404 then)
        Case("path: ..%2f", "GET", "/v1/jobs/..%2f", expect=frozenset({404, 307})),
        Case("path: ..%2f..%2fhealthz", "GET", "/v1/jobs/..%2f..%2fhealthz", expect=nf),
        Case("path: raw ../../healthz", "GET", "/v1/jobs/../../healthz", expect=frozenset({404, 200})),
        Case("path: <id>:done", "GET", f"/v1/jobs/{a}:done", expect=nf),
        Case("path: <id>%3Adone", "GET", f"/v1/jobs/{a}%3Adone", expect=nf),
        Case("path: cancel <id>:done", "POST", f"/v1/jobs/{a}:done/cancel", expect=nf),
        Case("path: 10,000-char id", "GET", "/v1/jobs/" + "a" * 10000, expect=frozenset({404, 414, 431})),
        Case("path: id + NUL", "GET", f"/v1/jobs/{a}%00", expect=nf),
        Case("path: upper-case id", "GET", f"/v1/jobs/{a.upper()}", expect=nf),
        Case("path: Redis key as id", "GET", f"/v1/jobs/undiffuse:job:{a}", expect=nf),
        Case("path: emoji id", "GET", "/v1/jobs/%F0%9F%92%A5", expect=nf),
        Case("path: own id/../B's id", "GET", f"/v1/jobs/{a}/../{b}", expect=nf, probe=True),
        Case("path: id;param", "GET", f"/v1/jobs/{a};x=1", expect=nf),
        Case("path: //v1/jobs/<id>", "GET", f"//v1/jobs/{a}", expect=frozenset({404, 200})),
        Case("path: trailing slash", "GET", f"/v1/jobs/{a}/", expect=frozenset({404, 307})),
        Case("path: PUT a job", "PUT", f"/v1/jobs/{a}", expect=frozenset({405})),
        Case("path: GET cancel", "GET", f"/v1/jobs/{a}/cancel", expect=frozenset({405})),
        Case("path: upper-case /V1/JOBS", "GET", "/V1/JOBS", expect=nf),
    ]


def headers(a: str) -> list[Case]:
    big = frozenset({400, 431})
    return [
        Case("header: 32 KiB X-Padding", "GET", f"/v1/jobs/{a}", headers=(("X-Padding", "a" * 32768),), expect=big),
        Case("header: 32 KiB Authorization", "GET", f"/v1/jobs/{a}", auth="Bearer " + "a" * 32768, expect=big),
        Case(
            "header: 200 x 100-byte headers",
            "GET",
            f"/v1/jobs/{a}",
            headers=tuple((f"X-H{i}", "b" * 100) for i in range(200)),
            expect=big,
        ),
        _post("header: 1,000-char Idempotency-Key", _with(), headers=(("Idempotency-Key", "k" * 1000),)),
        _post("header: Content-Length 10^12", _with(), {413}, headers=(("Content-Length", str(10**12)),)),
        _post("header: 65 KiB body", _with(seed=" " * 66000 + "1"), {413}),
        _post("header: chunked 100 KiB body", " " * 100_000 + _with(), {413}, chunked=True),
    ]


def auth(a_key: str, a: str) -> list[Case]:
    no = frozenset({401})
    ok = frozenset({200})
    target = f"/v1/jobs/{a}"
    return [
        Case("auth: none", "GET", target, key=None, expect=no),
        Case("auth: lower-case bearer", "GET", target, auth=f"bearer {a_key}", expect=ok),
        Case("auth: upper-case BEARER", "GET", target, auth=f"BEARER {a_key}", expect=ok),
        Case("auth: two spaces", "GET", target, auth=f"Bearer  {a_key}", expect=frozenset({200, 401})),
        Case("auth: key + x", "GET", target, auth=f"Bearer {a_key}x", expect=no),
        Case("auth: Basic", "GET", target, auth="Basic ZHJpbGw6a2V5", expect=no),
        Case("auth: bare scheme", "GET", target, auth="Bearer", expect=no),
        Case("auth: key without scheme", "GET", target, auth=a_key, expect=no),
        Case("auth: key in the query", "GET", f"{target}?api_key={a_key}", key=None, expect=no),
        Case("auth: submit without a key", "POST", "/v1/jobs", key=None, body=_with().encode(), expect=no),
    ]


def cross_key(a_ids: list[str], b: str, b_key: str, a_cursor: str, a_idem: str, a_body: dict) -> list[Case]:
    nf = frozenset({404})
    a1, a2 = a_ids[:2]
    return [
        Case("cross: B reads A's job", "GET", f"/v1/jobs/{a1}", key="B", expect=nf, probe=True),
        Case("cross: B reads A's 2nd job", "GET", f"/v1/jobs/{a2}", key="B", expect=nf, probe=True),
        Case("cross: B cancels A's job", "POST", f"/v1/jobs/{a1}/cancel", key="B", expect=nf, probe=True),
        Case("cross: B deletes A's job", "DELETE", f"/v1/jobs/{a1}", key="B", expect=frozenset({404, 405}), probe=True),
        Case(
            "cross: B reads A's job, lower-case bearer",
            "GET",
            f"/v1/jobs/{a1}",
            key="B",
            auth=f"bearer {b_key}",
            expect=nf,
            probe=True,
        ),
        Case("cross: A reads B's job", "GET", f"/v1/jobs/{b}", key="A", expect=nf, probe=True),
        Case("cross: A cancels B's job", "POST", f"/v1/jobs/{b}/cancel", key="A", expect=nf, probe=True),
        Case("cross: B lists", "GET", "/v1/jobs?limit=100", key="B", expect=frozenset({200})),
        Case(
            "cross: B lists succeeded", "GET", "/v1/jobs?status=succeeded&limit=100", key="B", expect=frozenset({200})
        ),
        Case("cross: B lists with A's cursor", "GET", f"/v1/jobs?cursor={a_cursor}", key="B", expect=frozenset({200})),
        Case(
            "cross: B lists succeeded with A's cursor",
            "GET",
            f"/v1/jobs?status=succeeded&limit=100&cursor={a_cursor}",
            key="B",
            expect=frozenset({200}),
        ),
        Case(
            "cross: B replays A's Idempotency-Key and body",
            "POST",
            "/v1/jobs",
            key="B",
            body=json.dumps(a_body).encode(),
            headers=(("Idempotency-Key", a_idem),),
            expect=frozenset({202}),
        ),
        Case("cursor: -1", "GET", "/v1/jobs?cursor=-1", key="B"),
        Case("cursor: text", "GET", "/v1/jobs?cursor=abc", key="B"),
        Case("cursor: A's cursor + NUL", "GET", f"/v1/jobs?cursor={a_cursor}%00", key="B"),
        Case("list: limit 0", "GET", "/v1/jobs?limit=0", key="B"),
        Case("list: status bogus", "GET", "/v1/jobs?status=bogus", key="B"),
    ]


def cases(a_ids: list[str], b_ids: list[str], keys: dict[str, str], a_cursor: str, a_idem: str, a_body: dict):
    out = (
        malformed()
        + non_finite()
        + out_of_range()
        + wrong_types()
        + paths(a_ids[0], b_ids[0])
        + headers(a_ids[0])
        + auth(keys["A"], a_ids[0])
        + cross_key(a_ids, b_ids[0], keys["B"], a_cursor, a_idem, a_body)
    )
    if len(out) != 100:
        raise AssertionError(f"{len(out)} hostile requests, not 100")
    return out


def send(host: str, port: int, case: Case, keys: dict[str, str], timeout: float = 30.0) -> Answer:
    lines = [f"{case.method} {case.target} HTTP/1.1".encode(), f"Host: {host}:{port}".encode(), b"Connection: close"]
    authorization = case.auth if case.auth is not None else (f"Bearer {keys[case.key]}" if case.key else None)
    if authorization is not None:
        lines.append(b"Authorization: " + authorization.encode())
    names = {k.lower() for k, _ in case.headers}
    lines += [f"{k}: {v}".encode() for k, v in case.headers]
    body = case.body
    if body is not None:
        if "content-type" not in names:
            lines.append(b"Content-Type: application/json")
        if case.chunked:
            lines.append(b"Transfer-Encoding: chunked")
            body = b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 8192]), body[i : i + 8192]) for i in range(0, len(body), 8192)
            )
            body += b"0\r\n\r\n"
        elif "content-length" not in names:
            lines.append(f"Content-Length: {len(body)}".encode())
    request = b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")
    received = []
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            try:
                s.sendall(request)
            except OSError:  # the server may answer and close before reading everything
                pass
            while chunk := s.recv(65536):
                received.append(chunk)
    except OSError as e:
        if not received:
            return Answer(case, None, f"{type(e).__name__}: {e}")
    raw = b"".join(received)
    status = re.match(rb"HTTP/1\.[01] (\d{3})", raw)
    if status is None:
        return Answer(case, None, f"no HTTP status line in {raw[:80]!r}")
    head, _, body = raw.partition(b"\r\n\r\n")
    code = int(status.group(1))
    location = re.search(rb"(?im)^location: *(.*?)\r?$", head) if 300 <= code < 400 else None
    return Answer(case, code, location=location.group(1).decode() if location else None, body=body)


def judge(answer: Answer, other_ids: set[str]) -> Answer:
    """A cross-key read: the answer names a job of the other key, or a probe for another key's job
    got anything but 401/404/405."""
    sent = answer.case.target.encode() + (answer.case.body or b"") + repr(answer.case.headers).encode()
    echoed = {m.decode() for m in HEX_ID.findall(sent)}  # a 422 may quote the request back: not a read
    leaked = ({m.decode() for m in HEX_ID.findall(answer.body)} - echoed) & other_ids
    probe_answered = answer.case.probe and answer.status not in (None, 401, 404, 405)
    answer.cross_key = bool(leaked) or probe_answered
    return answer


# --- resource attacks ---------------------------------------------------------------------------
# What one client may take of what every tenant shares, tried on a local stack with the
# application's default limits:  python bench/drill_hostile.py  (prints a Markdown table).

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
    import sys
    import tempfile
    from datetime import date
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import ray
    from ray import serve

    from service.api_keys import digest
    from service.app import AppArgs, build_app
    from service.dev.servers import RedisServer, S3Server, free_port

    work = Path(tempfile.mkdtemp(prefix="undiffuse-hostile-"))
    port = free_port()
    with (
        RedisServer(work / "redis").start() as redis,
        S3Server(work / "s3", access_key="drill", secret_key="drill-secret-123").start() as s3,
    ):
        try:
            ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            settings = {
                "redis_url": redis.url,
                "s3_endpoint_url": s3.endpoint,
                "s3_access_key_id": "drill",
                "s3_secret_access_key": "drill-secret-123",
                "api_keys": [f"{owner}=sha256:{digest(key)}" for owner, key in KEYS_R.items()],
            }
            serve.run(build_app(AppArgs(settings=settings)), name="undiffuse", route_prefix="/")
            rows = resource_attacks(f"http://127.0.0.1:{port}", redis.url)
        finally:
            serve.shutdown()
            ray.shutdown()
    print(
        f"# {platform.node()} {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"Ray {ray.__version__}, {date.today()}\n"
    )
    print("| attack | what the service held | 5xx |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
