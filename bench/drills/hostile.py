"""Phase 4: 100 hostile requests, sent byte for byte over a raw socket (no client library
normalises a path, drops a header or re-encodes a body on their way).

A correct service answers each with a 4xx (a few odd-but-valid forms with a 2xx), never a 5xx,
and never shows one key another key's job: every answer to key B is searched for key A's job
ids and the other way round, and a request for another key's job must be answered 404.
"""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from dataclasses import dataclass, field

import httpx

from bench.drills.load import KEYS, Job
from service.dev.stack import LocalStack

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


# --- the phase ---------------------------------------------------------------------------------
def hostile(stack: LocalStack, jobs: list[Job]) -> dict:
    """The cases against the drill's jobs, each answer judged; what the drill reports of them."""
    ids = {k: [j.id for j in jobs if j.key == k and j.id] for k in "AB"}
    a_job = next(j for j in jobs if j.key == "A" and j.id)
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {KEYS['A']}"}) as c:
        a_cursor = c.get("/v1/jobs", params={"limit": 2}).json()["next_cursor"]
    host, port = stack.base_url.removeprefix("http://").split(":")
    answers = []
    for case in cases(ids["A"], ids["B"], KEYS, a_cursor, a_job.idem, a_job.body):
        other = set(ids["B"]) if case.key == "A" else set(ids["A"]) if case.key == "B" else set(ids["A"] + ids["B"])
        answers.append(judge(send(host, int(port), case, KEYS), other))
    created = []
    for a in answers:  # the one that should make a job (B replaying A's Idempotency-Key)
        if a.status == 202:
            created += [m.decode() for m in HEX_ID.findall(a.body)[:1]]
    return {
        "requests": len(answers),
        "by_status": dict(Counter(str(a.status) for a in answers)),
        "server_errors": [f"{a.case.name}: {a.status}" for a in answers if a.status is not None and a.status >= 500],
        "cross_key_reads": [f"{a.case.name}: {a.status}" for a in answers if a.cross_key],
        "no_answer": [f"{a.case.name}: {a.error}" for a in answers if a.status is None],
        "redirects": [f"{a.case.name}: {a.status} to {a.location}" for a in answers if a.location],
        "unexpected": [
            f"{a.case.name}: {a.status} (expected {sorted(a.case.expect)})" for a in answers if not a.expected
        ],
        "jobs_created": created,
    }
