"""Where a webhook may be delivered: the SSRF guard.

A webhook URL names a host of the caller's choosing, which the service then connects to from
inside its network. The guard (`checked_addresses`, run at submission for a 422 and again at
each delivery, which connects to the address it checked, service.webhooks.sender) refuses:

- a URL with a user name or password in it (`user:pass@host`): the credentials would be sent
  as Basic auth, and are kept on the job record and shown back;
- `http://` where the server takes `https://` only (production);
- a port other than 80 and 443 and Settings.webhook_allowed_ports: other ports are where
  internal services listen (Redis, databases, admin consoles);
- a host with an address in the special-purpose ranges of IANA's IPv4 and IPv6 Special-Purpose
  Address Registries, multicast or reserved space, IPv6 outside global unicast (2000::/3), and
  IPv4 carried in IPv6 (mapped, NAT64, 6to4) judged by the IPv4 address it reaches. The ranges
  are listed here rather than taken from the stdlib's is_private / is_global, whose tables have
  changed between Python releases and missed some (192.0.0.192 passed as global);
- a name that does not resolve, and a name with any refused address, with the same message: the
  guard tells a caller nothing about what the service's DNS knows.

Settings.webhook_allow_private turns the port and address checks off (development and tests;
production refuses it). Lookups run on threads of their own with a budget per owner (`Lookups`),
so a name whose DNS never answers holds its owner's lookups back, nobody else's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from service.settings import WebhookSettings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
DEFAULT_PORTS = frozenset({80, 443})
LOOKUP_THREADS = 128  # lookups in flight per process, whoever they are for

_v4, _v6 = ipaddress.IPv4Network, ipaddress.IPv6Network
# (range, what it is) in the order they are checked: a smaller range before one that holds it.
DENIED_V4: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (_v4("0.0.0.0/8"), "unspecified"),  # "this network"
    (_v4("10.0.0.0/8"), "private"),
    (_v4("100.64.0.0/10"), "shared (carrier-grade NAT)"),
    (_v4("127.0.0.0/8"), "loopback"),
    (_v4("169.254.0.0/16"), "link-local"),  # the cloud metadata service is 169.254.169.254
    (_v4("172.16.0.0/12"), "private"),
    (_v4("192.0.0.0/24"), "special-purpose"),  # IETF protocol assignments, all of it
    (_v4("192.0.2.0/24"), "documentation"),
    (_v4("192.31.196.0/24"), "special-purpose"),  # AS112
    (_v4("192.52.193.0/24"), "special-purpose"),  # AMT
    (_v4("192.88.99.0/24"), "special-purpose"),  # the former 6to4 relay anycast
    (_v4("192.168.0.0/16"), "private"),
    (_v4("192.175.48.0/24"), "special-purpose"),  # AS112 direct delegation
    (_v4("198.18.0.0/15"), "benchmarking"),
    (_v4("198.51.100.0/24"), "documentation"),
    (_v4("203.0.113.0/24"), "documentation"),
    (_v4("224.0.0.0/4"), "multicast"),
    (_v4("255.255.255.255/32"), "broadcast"),
    (_v4("240.0.0.0/4"), "reserved"),
)
DENIED_V6: tuple[tuple[ipaddress.IPv6Network, str], ...] = (
    (_v6("::/128"), "unspecified"),
    (_v6("::1/128"), "loopback"),
    (_v6("64:ff9b:1::/48"), "special-purpose"),  # local-use IPv4/IPv6 translation
    (_v6("100::/64"), "special-purpose"),  # discard-only
    (_v6("100:0:0:1::/64"), "special-purpose"),  # dummy prefix
    (_v6("2001::/23"), "special-purpose"),  # IETF protocol assignments: Teredo, ORCHID, AS112, ...
    (_v6("2001:db8::/32"), "documentation"),
    (_v6("2620:4f:8000::/48"), "special-purpose"),  # AS112 direct delegation
    (_v6("3fff::/20"), "documentation"),
    (_v6("5f00::/16"), "special-purpose"),  # segment routing SIDs
    (_v6("fc00::/7"), "private"),  # unique local
    (_v6("fe80::/10"), "link-local"),
    (_v6("fec0::/10"), "private"),  # the former site-local
    (_v6("ff00::/8"), "multicast"),
)
GLOBAL_UNICAST = _v6("2000::/3")  # the only IPv6 space allocated for public addresses
MAPPED, NAT64, SIX_TO_FOUR = _v6("::ffff:0:0/96"), _v6("64:ff9b::/96"), _v6("2002::/16")


class AddressRefused(Exception):
    """The URL may not be delivered to; the message says why, in words for a 422."""


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one reaches (IPv4-mapped, NAT64 well-known prefix, 6to4), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip in MAPPED:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in SIX_TO_FOUR:
        return ip.sixtofour
    return None


def refusal(ip: IPAddress) -> str | None:
    """What kind of non-public address ip is ("loopback", "private", ...), or None for a public one."""
    inner = embedded_ipv4(ip)
    if inner is not None:  # judged by where it leads
        return refusal(inner)
    if isinstance(ip, ipaddress.IPv4Address):
        return next((kind for net, kind in DENIED_V4 if ip in net), None)
    kind = next((kind for net, kind in DENIED_V6 if ip in net), None)
    if kind is None and ip not in GLOBAL_UNICAST:
        kind = "reserved"
    return kind


@dataclass(frozen=True)
class Guard:
    """What a webhook URL must satisfy: Settings' webhook_* fields, as the checks use them."""

    allow_private: bool = False  # no port and address checks (development and tests)
    https_only: bool = False  # production: no plain http:// (the payload carries presigned URLs)
    ports: frozenset[int] = DEFAULT_PORTS
    resolve_timeout: float = 2.0
    lookups_per_owner: int = 2

    @classmethod
    def from_settings(cls, settings: WebhookSettings) -> Guard:
        return cls(
            allow_private=settings.allow_private,
            https_only=settings.production,
            ports=DEFAULT_PORTS | frozenset(settings.allowed_ports),
            resolve_timeout=settings.resolve_timeout_seconds,
            lookups_per_owner=settings.resolve_concurrency_per_owner,
        )


class Lookups:
    """getaddrinfo on a thread per lookup, at most `per_owner` lookups in flight per owner (the
    caller's argument) and LOOKUP_THREADS in all.

    getaddrinfo cannot be interrupted: a lookup whose caller gave up keeps its thread, and its
    place in its owner's budget, until the resolver answers. So an owner whose names never answer
    soon waits on its own budget (its attempts time out), while other owners' lookups go on; a
    shared pool would have filled with that owner's stuck lookups. Waiting for a place is polled:
    it happens only to an owner already over its budget, and works across event loops."""

    def __init__(self, threads: int = LOOKUP_THREADS, getaddrinfo: Callable[..., list] = socket.getaddrinfo) -> None:
        self.threads = threads
        self.resolve = getaddrinfo  # another resolver: tests
        self._lock = threading.Lock()
        self._busy: Counter[str] = Counter()
        self._running = 0

    def in_flight(self, owner: str) -> int:
        with self._lock:
            return self._busy[owner]

    def _enter(self, owner: str, per_owner: int) -> bool:
        with self._lock:
            if self._busy[owner] >= per_owner or self._running >= self.threads:
                return False
            self._busy[owner] += 1
            self._running += 1
            return True

    def _leave(self, owner: str) -> None:
        with self._lock:
            self._running -= 1
            self._busy[owner] -= 1
            if self._busy[owner] <= 0:
                del self._busy[owner]

    async def getaddrinfo(self, owner: str, per_owner: int, host: str, port: int, timeout: float) -> list:
        """socket.getaddrinfo(host, port) for owner within timeout seconds in all (waiting for a
        place included); asyncio.TimeoutError when it takes longer, OSError when it fails."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pause = 0.005
        while not self._enter(owner, per_owner):
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            await asyncio.sleep(min(pause, left))
            pause = min(2 * pause, 0.05)
        answer: asyncio.Future = loop.create_future()

        def settle(result: list | None, error: BaseException | None) -> None:
            if answer.done():  # the caller gave up
                return
            if error is not None:
                answer.set_exception(error)
            else:
                answer.set_result(result)

        def lookup() -> None:
            result, error = None, None
            try:
                result = self.resolve(host, port, type=socket.SOCK_STREAM)
            except Exception as e:  # socket.gaierror, UnicodeError for a bad name
                error = e
            finally:
                self._leave(owner)
            try:
                loop.call_soon_threadsafe(settle, result, error)
            except RuntimeError:  # the loop has closed meanwhile
                pass

        threading.Thread(target=lookup, name="webhook-dns", daemon=True).start()
        return await asyncio.wait_for(answer, max(0.0, deadline - loop.time()))


LOOKUPS = Lookups()


def _parse(url: str, guard: Guard) -> tuple[httpx.URL, int]:
    """The URL and its port, when nothing but its host's addresses could still refuse it."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as e:
        raise AddressRefused(f"not a URL: {e}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise AddressRefused("must be an http:// or https:// URL with a host")
    if parsed.userinfo:
        raise AddressRefused("must not contain a user name or password (user:password@host)")
    if guard.https_only and parsed.scheme != "https":
        raise AddressRefused("must be an https:// URL: this server sends webhooks over TLS only")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not guard.allow_private and port not in guard.ports:
        allowed = ", ".join(str(p) for p in sorted(guard.ports))
        raise AddressRefused(f"port {port} is not open to webhooks (this server allows ports {allowed})")
    return parsed, port


def _article(kind: str) -> str:
    return "an" if kind[0] in "aeiou" else "a"


async def checked_addresses(url: str, guard: Guard, owner: str | None = None) -> list[IPAddress]:
    """The addresses to deliver url to: all that its host resolves to, each of them public unless
    guard.allow_private (one refused answer refuses the URL: a name must not be able to mix a
    public and an internal address and hope for the latter). owner: whose lookup budget the
    lookup counts in (None: the host's own)."""
    parsed, port = _parse(url, guard)
    host = parsed.host
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:  # the caller wrote the address: telling what it is reveals nothing
        why = None if guard.allow_private else refusal(literal)
        if why is not None:
            raise AddressRefused(f"{literal}, {_article(why)} {why} address; webhooks go to public addresses only")
        return [literal]
    # One message for a name that does not resolve, resolves too slowly, or resolves to a refused
    # address: a caller must not learn from it which internal names exist, nor their addresses.
    refused = AddressRefused(
        f"host {host!r} does not resolve"
        if guard.allow_private
        else f"host {host!r} does not resolve to a public address; webhooks go to public addresses only"
    )
    try:
        infos = await LOOKUPS.getaddrinfo(
            owner if owner is not None else f"host:{host}", guard.lookups_per_owner, host, port, guard.resolve_timeout
        )
    except (asyncio.TimeoutError, OSError, UnicodeError):
        raise refused from None
    ips: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if ip not in ips:
            ips.append(ip)
    if not ips or not guard.allow_private and any(refusal(ip) is not None for ip in ips):
        raise refused
    return ips
