"""Where a webhook may be delivered: the SSRF guard.

A webhook URL names a host of the caller's choosing, which the service then connects to from
inside its network. Unless Settings.webhook_allow_private, every address the host resolves to
must be a public one: no loopback, private (RFC 1918, unique local), link-local (169.254/16,
the cloud metadata address among them), multicast, reserved, unspecified, shared (CGNAT) or
otherwise non-global address, also when wrapped in IPv6 (IPv4-mapped, NAT64, 6to4). The check
runs at submission (a 422) and again at each delivery, which connects to the address it checked
(service.webhooks.sender), so a DNS answer that changes in between cannot redirect it.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx

# Lookups of webhook hosts get threads of their own: a name whose DNS never answers holds its
# thread past the timeout, and must not hold the default pool's (uploads, presigning) meanwhile.
_RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(Exception):
    """The URL may not be delivered to; the message says why, in words for a 422."""


def _embedded(ip: IPAddress) -> list[IPAddress]:
    """Any IPv4 address an IPv6 one carries (mapped, NAT64, 6to4), then ip itself."""
    out: list[IPAddress] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            out.append(ip.ipv4_mapped)
        if ip in NAT64:
            out.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:
            out.append(ip.sixtofour)
    return [*out, ip]


def refusal(ip: IPAddress) -> str | None:
    """Why a webhook may not go to ip ("loopback", "private", ...), or None for a public address."""
    for addr in _embedded(ip):
        for kind, hit in (
            ("unspecified", addr.is_unspecified),
            ("loopback", addr.is_loopback),
            ("link-local", addr.is_link_local),
            ("multicast", addr.is_multicast),
            ("private", addr.is_private),
            ("reserved", addr.is_reserved),
            ("not globally routable", not addr.is_global),
        ):
            if hit:
                return kind
    return None


async def resolve(host: str, port: int, timeout: float) -> list[IPAddress]:
    """The addresses host resolves to (an IP literal is itself), looked up off the event loop."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    lookup = loop.run_in_executor(_RESOLVER, functools.partial(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM))
    try:
        infos = await asyncio.wait_for(lookup, timeout)
    except asyncio.TimeoutError:
        raise AddressRefused(f"host {host!r} did not resolve within {timeout:g} s") from None
    except OSError as e:  # socket.gaierror
        raise AddressRefused(f"host {host!r} does not resolve ({e.strerror or e})") from None
    ips: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone
        if ip not in ips:
            ips.append(ip)
    if not ips:
        raise AddressRefused(f"host {host!r} has no address")
    return ips


async def checked_addresses(url: str, allow_private: bool, timeout: float) -> list[IPAddress]:
    """The addresses to deliver url to: all that its host resolves to, each of them public
    unless allow_private (one private answer refuses the URL: a name must not be able to mix
    a public and an internal address and hope for the latter)."""
    parsed = httpx.URL(url)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ips = await resolve(parsed.host, port, timeout)
    if not allow_private:
        for ip in ips:
            why = refusal(ip)
            if why is not None:
                # a name's address stays out of the message: it goes back to the client (the 422,
                # the job's webhook outcome), which must not learn the internal DNS from it
                shown = (
                    f"{ip}, a {why} address"
                    if parsed.host == str(ip)
                    else f"{parsed.host!r} resolves to a {why} address"
                )
                raise AddressRefused(f"{shown}; webhooks go to public addresses only")
    return ips
