"""Webhook delivery over https: the POST goes to the address the SSRF guard checked, yet TLS
(SNI and certificate verification) and the Host header use the URL's host name, and a
certificate that does not match that name, or that no trusted root signed, fails the attempt
before anything is sent."""

from __future__ import annotations

import asyncio
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import trustme

from service.webhooks import sender


class TLSReceiver:
    """An https server on 127.0.0.1 presenting `cert`; records the SNI name of every handshake
    and (Host header, body) of every POST that got through."""

    def __init__(self, cert: trustme.LeafCert) -> None:
        self.sni: list[str | None] = []
        self.posts: list[tuple[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
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
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def deliver(url: str, verify: ssl.SSLContext | bool) -> sender.Attempt:
    async def main() -> sender.Attempt:
        async with sender.client(verify) as http:
            return await sender.post(
                http, url, '{"type":"job.succeeded"}', {"webhook-id": "msg_1"}, timeout=5.0,
                allow_private=True, resolve_timeout=2.0,
            )  # fmt: skip

    return asyncio.run(main())


def test_https_delivery_pins_the_address_but_verifies_and_names_the_host(ca):
    receiver = TLSReceiver(ca.issue_cert("localhost"))
    try:
        attempt = deliver(f"https://localhost:{receiver.port}/hook", trusting(ca))
        assert attempt.delivered and attempt.status_code == 204, attempt
        assert receiver.sni == ["localhost"]  # not the pinned 127.0.0.1
        assert receiver.posts == [(f"localhost:{receiver.port}", '{"type":"job.succeeded"}')]
    finally:
        receiver.close()


def test_a_certificate_for_another_name_fails_the_attempt_before_the_post(ca):
    receiver = TLSReceiver(ca.issue_cert("other.example"))
    try:
        attempt = deliver(f"https://localhost:{receiver.port}/hook", trusting(ca))
        assert not attempt.delivered and attempt.status_code is None
        assert "CERTIFICATE_VERIFY_FAILED" in attempt.error and "localhost" in attempt.error, attempt.error
        assert receiver.posts == []
    finally:
        receiver.close()


def test_the_default_client_trusts_only_public_roots(ca):
    """The dispatcher's own client (certifi's roots) refuses a certificate from an unknown CA."""
    receiver = TLSReceiver(ca.issue_cert("localhost"))
    try:
        attempt = deliver(f"https://localhost:{receiver.port}/hook", True)
        assert not attempt.delivered and "CERTIFICATE_VERIFY_FAILED" in attempt.error, attempt.error
        assert receiver.posts == []
    finally:
        receiver.close()
