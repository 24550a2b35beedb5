"""Webhook delivery over https: the POST goes to the address the SSRF guard checked, yet TLS
(SNI and certificate verification) and the Host header use the URL's host name, and a
certificate that does not match that name, or that no trusted root signed, fails the attempt
before anything is sent.

The receiver's name, hooks.example.test, resolves nowhere (.test is reserved): the guard is
replaced by one that answers 127.0.0.1, so a delivery can only arrive through the pinned
address, whatever this machine's resolver does with names."""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from service.webhooks import sender
from service.webhooks.addresses import Guard


class TLSReceiver:
    """An https server on 127.0.0.1 presenting `cert`; records the SNI name of every handshake
    and (Host header, body) of every POST that got through."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.sni: list[str | None] = []
        self.posts: list[tuple[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:  # the handshake in the handler's thread, never in accept()
                self.request.settimeout(5.0)
                self.request.do_handshake()
                super().setup()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                receiver.posts.append((self.headers["Host"], body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(context)
        context.sni_callback = lambda _sock, name, _ctx: self.sni.append(name)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.handle_error = lambda *args: None  # a refused handshake is the expected outcome
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


HOST = "hooks.example.test"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(autouse=True)
def guard(monkeypatch) -> list[str]:
    """The SSRF guard, answering 127.0.0.1 for HOST (and recording the URLs it checked)."""
    checked: list[str] = []

    async def checked_addresses(url: str, guard: Guard, owner: str | None = None):
        checked.append(url)
        return [ipaddress.ip_address("127.0.0.1")]

    monkeypatch.setattr(sender, "checked_addresses", checked_addresses)
    return checked


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def deliver(url: str, verify: ssl.SSLContext | bool) -> sender.Attempt:
    async def main() -> sender.Attempt:
        async with sender.client(verify) as http:
            return await sender.post(
                http, url, '{"type":"job.succeeded"}', {"webhook-id": "msg_1"}, timeout=5.0,
                guard=Guard(allow_private=True),
            )  # fmt: skip

    return asyncio.run(main())


def test_https_delivery_pins_the_address_but_verifies_and_names_the_host(ca, guard):
    receiver = TLSReceiver(ca.issue_cert(HOST))
    try:
        url = f"https://{HOST}:{receiver.port}/hook"
        attempt = deliver(url, trusting(ca))
        assert attempt.delivered and attempt.status_code == 204, attempt
        assert guard == [url]
        assert receiver.sni == [HOST]  # not the pinned 127.0.0.1
        assert receiver.posts == [(f"{HOST}:{receiver.port}", '{"type":"job.succeeded"}')]
    finally:
        receiver.close()


def test_a_certificate_for_another_name_fails_the_attempt_before_the_post(ca):
    receiver = TLSReceiver(ca.issue_cert("other.example"))
    try:
        attempt = deliver(f"https://{HOST}:{receiver.port}/hook", trusting(ca))
        assert not attempt.delivered and attempt.status_code is None
        assert "CERTIFICATE_VERIFY_FAILED" in attempt.error and HOST in attempt.error, attempt.error
        assert receiver.posts == []
    finally:
        receiver.close()


def test_the_default_client_trusts_only_public_roots(ca):
    """The dispatcher's own client (certifi's roots) refuses a certificate from an unknown CA."""
    receiver = TLSReceiver(ca.issue_cert(HOST))
    try:
        attempt = deliver(f"https://{HOST}:{receiver.port}/hook", True)
        assert not attempt.delivered and "CERTIFICATE_VERIFY_FAILED" in attempt.error, attempt.error
        assert receiver.posts == []
    finally:
        receiver.close()
