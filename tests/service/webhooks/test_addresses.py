"""The SSRF guard: which addresses and ports a webhook may go to, URLs checked by resolving them,
and the DNS lookups' budget per owner."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
import time

import pytest

from service.webhooks import addresses
from service.webhooks.addresses import AddressRefused, Guard, Lookups, checked_addresses, refusal


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),  # "this network"
        ("10.1.2.3", "private"),
        ("100.64.0.1", "shared (carrier-grade NAT)"),
        ("100.127.255.254", "shared (carrier-grade NAT)"),
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("172.16.0.1", "private"),
        ("172.31.255.255", "private"),
        ("192.0.0.1", "special-purpose"),
        ("192.0.0.9", "special-purpose"),  # PCP anycast: "globally reachable", still no webhook receiver
        ("192.0.0.192", "special-purpose"),  # passed as global by the stdlib's tables
        ("192.0.2.1", "documentation"),
        ("192.31.196.1", "special-purpose"),
        ("192.52.193.1", "special-purpose"),
        ("192.88.99.1", "special-purpose"),
        ("192.168.1.1", "private"),
        ("192.175.48.1", "special-purpose"),
        ("198.18.0.1", "benchmarking"),
        ("198.19.255.255", "benchmarking"),
        ("198.51.100.7", "documentation"),
        ("203.0.113.9", "documentation"),
        ("224.0.0.1", "multicast"),
        ("239.255.255.250", "multicast"),
        ("240.0.0.1", "reserved"),
        ("255.255.255.254", "reserved"),
        ("255.255.255.255", "broadcast"),
        ("::", "unspecified"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped: judged by the IPv4 address
        ("::ffff:169.254.169.254", "link-local"),
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("64:ff9b::c000:c0", "special-purpose"),  # NAT64 of 192.0.0.192
        ("64:ff9b:1::1", "special-purpose"),  # local-use translation
        ("100::1", "special-purpose"),  # discard-only
        ("2001::1", "special-purpose"),  # Teredo
        ("2001:2::1", "special-purpose"),  # benchmarking, in 2001::/23
        ("2001:1ff::1", "special-purpose"),
        ("2001:db8::1", "documentation"),
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::1", "link-local"),  # 6to4 of 169.254.169.254
        ("3fff::1", "documentation"),
        ("fc00::1", "private"),
        ("fd12:3456::1", "private"),
        ("fe80::1", "link-local"),
        ("fec0::1", "private"),
        ("ff02::1", "multicast"),
        ("::1.2.3.4", "reserved"),  # IPv4-compatible (deprecated): outside global unicast
        ("4000::1", "reserved"),  # not allocated
    ],
)
def test_special_purpose_addresses_are_refused_with_the_reason(address, why):
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize(
    "address",
    [
        "93.184.215.14",
        "8.8.8.8",
        "1.1.1.1",
        "100.63.255.255",  # just below the shared space
        "100.128.0.0",
        "172.32.0.1",
        "192.0.1.1",
        "198.20.0.1",
        "223.255.255.255",
        "2606:4700:4700::1111",
        "2001:200::1",  # just past 2001::/23
        "2002:5db8:d70e::1",  # 6to4 of 93.184.215.14
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
    ],
)
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address)) is None


def check(url: str, guard: Guard | None = None, owner: str | None = None):
    return asyncio.run(checked_addresses(url, guard or Guard(), owner))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1/hook", "127.0.0.1, a loopback address"),
        ("https://10.0.0.7/hook", "10.0.0.7, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://[::1]/", "::1, a loopback address"),
        ("http://0.0.0.0/", "0.0.0.0, an unspecified address"),
        ("https://192.0.0.192/", "192.0.0.192, a special-purpose address"),
    ],
)
def test_ip_literals_of_non_public_addresses_are_refused_with_the_reason(url, message):
    with pytest.raises(AddressRefused, match=message.replace(".", r"\.").replace("[", r"\[")):
        check(url)


def test_a_name_that_does_not_resolve_and_one_that_resolves_inside_get_the_same_answer():
    """The guard is no DNS oracle: a caller cannot tell an internal name from a missing one."""
    answers = []
    for host in ("localhost", "does-not-exist.invalid"):
        with pytest.raises(AddressRefused) as refused:
            check(f"https://{host}/hook")
        answers.append(str(refused.value).replace(repr(host), "HOST"))
        assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)
        assert "loopback" not in str(refused.value)
    assert (
        answers[0]
        == answers[1]
        == "host HOST does not resolve to a public address; webhooks go to public addresses only"
    )


def test_a_name_with_one_internal_address_among_public_ones_gets_the_same_answer(monkeypatch):
    def getaddrinfo(host, port, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ("93.184.215.14", "10.0.0.1")]

    monkeypatch.setattr(addresses, "LOOKUPS", Lookups(getaddrinfo=getaddrinfo))
    with pytest.raises(AddressRefused, match="^host 'mixed.example' does not resolve to a public address;"):
        check("https://mixed.example/")


def test_a_lookup_that_takes_too_long_gets_the_same_answer(monkeypatch):
    release = threading.Event()

    def getaddrinfo(host, port, **kwargs):
        release.wait(10)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(addresses, "LOOKUPS", Lookups(getaddrinfo=getaddrinfo))
    try:
        with pytest.raises(AddressRefused, match="^host 'slow.example' does not resolve to a public address;"):
            asyncio.run(checked_addresses("https://slow.example/", Guard(resolve_timeout=0.2)))
    finally:
        release.set()


@pytest.mark.parametrize("url", ["https://user:secret@93.184.215.14/hook", "https://token@93.184.215.14/"])
def test_urls_with_credentials_are_refused(url):
    with pytest.raises(AddressRefused, match=r"must not contain a user name or password"):
        check(url)
    with pytest.raises(AddressRefused, match=r"must not contain a user name or password"):
        check(url, Guard(allow_private=True))  # not even in development: they would be sent and shown


@pytest.mark.parametrize("port", [22, 6379, 8000, 8080, 8443, 9000])
def test_only_ports_80_and_443_and_the_configured_ones_are_open(port):
    with pytest.raises(
        AddressRefused, match=rf"port {port} is not open to webhooks \(this server allows ports 80, 443\)"
    ):
        check(f"https://93.184.215.14:{port}/hook")
    assert [str(ip) for ip in check(f"https://93.184.215.14:{port}/", Guard(ports=frozenset({80, 443, port})))] == [
        "93.184.215.14"
    ]
    assert check(f"http://127.0.0.1:{port}/", Guard(allow_private=True))  # the guard off: any port
    for default in ("http://93.184.215.14/", "http://93.184.215.14:80/", "https://93.184.215.14:443/"):
        assert check(default)


def test_https_only_refuses_plain_http():
    with pytest.raises(AddressRefused, match=r"must be an https:// URL"):
        check("http://93.184.215.14/hook", Guard(https_only=True))
    assert check("https://93.184.215.14/hook", Guard(https_only=True))


def test_allow_private_lets_internal_addresses_through_but_still_resolves():
    guard = Guard(allow_private=True)
    assert [str(ip) for ip in check("http://127.0.0.1:9/", guard)] == ["127.0.0.1"]
    assert "127.0.0.1" in [str(ip) for ip in check("http://localhost:9/", guard)]
    with pytest.raises(AddressRefused, match="^host 'does-not-exist.invalid' does not resolve$"):
        check("http://does-not-exist.invalid/", guard)


def test_a_public_ip_literal_needs_no_lookup():
    assert [str(ip) for ip in check("https://93.184.215.14/hook")] == ["93.184.215.14"]


def test_settings_make_the_guard():
    from service.settings import Settings

    guard = Guard.from_settings(
        Settings(webhook_allowed_ports=[8443], webhook_resolve_concurrency_per_owner=3).webhooks
    )
    assert guard == Guard(
        allow_private=False,
        https_only=False,
        ports=frozenset({80, 443, 8443}),
        resolve_timeout=2.0,
        lookups_per_owner=3,
    )


# --- the lookups' budget ---------------------------------------------------------------------------
@pytest.fixture
def hanging_dns(monkeypatch):
    """getaddrinfo that never answers for names under hang.example (until the test ends) and
    answers 93.184.215.14 for any other; yields the calls made, as (host, start time)."""
    release = threading.Event()
    calls: list[tuple[str, float]] = []

    def getaddrinfo(host, port, **kwargs):
        calls.append((host, time.monotonic()))
        if host.endswith("hang.example"):
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    monkeypatch.setattr(addresses, "LOOKUPS", Lookups(getaddrinfo=getaddrinfo))
    yield calls
    release.set()


def test_lookups_that_never_answer_hold_back_their_owner_only(hanging_dns):
    """Owner A's names never resolve, and its attempts keep coming (each gives up after its
    timeout, but its lookup goes on holding a thread): A never has more than its budget of
    lookups running, and B's lookups answer at once all along."""
    lookups = Lookups(threads=8, getaddrinfo=addresses.LOOKUPS.resolve)

    async def main():
        a = [lookups.getaddrinfo("A", 2, f"{i}.hang.example", 443, 0.2) for i in range(20)]
        results = await asyncio.gather(*a, return_exceptions=True)
        assert all(isinstance(r, asyncio.TimeoutError) for r in results)
        assert lookups.in_flight("A") == 2  # still stuck, past their callers' timeouts
        started = time.monotonic()
        b = await asyncio.gather(*(lookups.getaddrinfo("B", 2, "b.example", 443, 0.5) for _ in range(10)))
        return time.monotonic() - started, b

    took, answers = asyncio.run(main())
    assert took < 0.3 and all(a[0][4][0] == "93.184.215.14" for a in answers)
    assert len([h for h, _ in hanging_dns if h.endswith("hang.example")]) == 2  # A's budget, no more
    assert lookups.in_flight("B") == 0


def test_an_owner_within_its_budget_waits_for_a_place_rather_than_failing():
    def getaddrinfo(host, port, **kwargs):
        time.sleep(0.05)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port))]

    lookups = Lookups(getaddrinfo=getaddrinfo)

    async def main():
        return await asyncio.gather(*(lookups.getaddrinfo("A", 1, "a.example", 443, 2.0) for _ in range(5)))

    assert len(asyncio.run(main())) == 5  # one at a time, each well within the timeout


def test_the_guard_counts_a_submissions_lookup_in_its_owners_budget(hanging_dns):
    guard = Guard(resolve_timeout=0.2, lookups_per_owner=1)

    async def main():
        for _ in range(3):
            with pytest.raises(AddressRefused):
                await checked_addresses("https://x.hang.example/", guard, owner="guard-A")
        return await checked_addresses("https://b.example/", guard, owner="guard-B")

    assert [str(ip) for ip in asyncio.run(main())] == ["93.184.215.14"]
    assert [h for h, _ in hanging_dns].count("x.hang.example") == 1
