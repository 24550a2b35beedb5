"""The SSRF guard: which addresses a webhook may go to, and URLs checked by resolving them."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from service.webhooks.addresses import AddressRefused, checked_addresses, refusal


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("fc00::1", "private"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "private"),  # reserved (class E); ipaddress also calls it private
        ("100.64.0.1", "not globally routable"),  # shared address space (carrier-grade NAT)
        ("192.0.2.1", "private"),  # documentation (TEST-NET-1)
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
        ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ],
)
def test_non_public_addresses_are_refused_with_the_reason(address, why):
    assert refusal(ipaddress.ip_address(address)) == why


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"])
def test_public_addresses_pass(address):
    assert refusal(ipaddress.ip_address(address)) is None


def check(url: str, allow_private: bool = False):
    return asyncio.run(checked_addresses(url, allow_private, timeout=2.0))


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://127.0.0.1:9/hook", "127.0.0.1, a loopback address"),
        ("https://10.0.0.7/hook", "10.0.0.7, a private address"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254, a link-local address"),
        ("http://[::1]:8080/", "::1, a loopback address"),
        ("http://localhost:8000/hook", "'localhost' resolves to a loopback address"),
        ("http://does-not-exist.invalid/hook", "'does-not-exist.invalid' does not resolve"),
    ],
)
def test_urls_that_reach_non_public_or_no_addresses_are_refused(url, message):
    with pytest.raises(AddressRefused, match=message.replace(".", r"\.").replace("[", r"\[")):
        check(url)


def test_a_refused_names_internal_address_is_not_told_to_the_client():
    with pytest.raises(AddressRefused) as refused:
        check("http://localhost:8000/hook")
    assert "127.0.0.1" not in str(refused.value) and "::1" not in str(refused.value)


def test_allow_private_lets_internal_addresses_through_but_still_resolves():
    assert [str(ip) for ip in check("http://127.0.0.1:9/", allow_private=True)] == ["127.0.0.1"]
    assert "127.0.0.1" in [str(ip) for ip in check("http://localhost:9/", allow_private=True)]
    with pytest.raises(AddressRefused, match="does not resolve"):
        check("http://does-not-exist.invalid/", allow_private=True)


def test_a_public_ip_literal_needs_no_lookup():
    assert [str(ip) for ip in check("https://93.184.215.14/hook")] == ["93.184.215.14"]
