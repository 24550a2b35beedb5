"""What a request may bring before any route runs: header bytes and body bytes.

The body is counted as it arrives (Starlette's RequestBodyLimitMiddleware) and cut at the limit,
so an upload without a Content-Length is never held whole; FastAPI reads a route's body before it
resolves the route's dependencies, so an oversized body is refused before any authentication
work. A declared Content-Length over the limit is refused before a byte is read, and a body of
unknown length on a method whose routes take none (GET, HEAD, DELETE, OPTIONS) gets 411.
"""

from __future__ import annotations

from collections.abc import Callable

from starlette.middleware.body_limit import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

MAX_HEADER_BYTES = 16 * 1024
BODYLESS_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes"


class RequestLimits:
    """ASGI middleware: 431 for headers over MAX_HEADER_BYTES, 400 for a malformed
    Content-Length, 411 for a body of unknown length where none is taken, 413 for a body over
    `limit()` bytes (read per request: the limit is a setting, known once the app's context is)."""

    def __init__(self, app: ASGIApp, limit: Callable[[], int]) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        header_bytes = sum(len(k) + len(v) for k, v in headers)
        limit = self.limit()
        refusal = None
        if header_bytes > MAX_HEADER_BYTES:
            refusal = 431, f"request headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES}"
        else:
            lengths = [v for k, v in headers if k == b"content-length"]
            chunked = any(k == b"transfer-encoding" for k, _ in headers)
            # more than 19 digits is no length a body here could have (and int() refuses 4,300)
            if len(lengths) > 1 or (lengths and not (lengths[0].isdigit() and len(lengths[0]) <= 19)):
                refusal = 400, "Content-Length must be one decimal number"
            elif lengths and int(lengths[0]) > limit:
                refusal = 413, f"request body is {int(lengths[0])} bytes; the limit is {limit}"
            elif chunked and not lengths and scope["method"] in BODYLESS_METHODS:
                refusal = 411, f"{scope['method']} takes no request body; send none (or a Content-Length)"
        if refusal is not None:
            status, detail = refusal
            # the unread body stays unread: the server closes the connection after this answer
            await JSONResponse({"detail": detail}, status_code=status, headers={"Connection": "close"})(
                scope, receive, send
            )
            return
        await RequestBodyLimitMiddleware(self.app, max_body_size=limit)(scope, receive, send)
