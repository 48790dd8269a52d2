"""Security headers on every answer: a Content-Security-Policy, no framing, no MIME sniffing.

The dashboard and the API run only the server's own files: :data:`APP_POLICY` allows scripts,
styles, fonts and requests from the app itself (``default-src 'self'``), images also as
``data:`` URLs (the dashboard's icon), and no inline script or style attribute. The one inline
exception is an *empty* ``<style>`` element, allowed by its hash: plotly.js creates one and
fills it through the CSSOM (``insertRule``, which the policy does not restrict). An answer
that needs another policy sets its own header, which :class:`SecurityHeaders` keeps: the
API docs (``/docs``, ``/redoc``) load Swagger UI and ReDoc from cdn.jsdelivr.net and get
:func:`docs_policy` — that CDN, the sha256 of each inline script of the page, and inline
styles (both UIs set style attributes). Offline, the docs page stays blank; the OpenAPI
document is at ``/openapi.json``.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["APP_POLICY", "SecurityHeaders", "docs_policy"]

_COMMON = "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
_EMPTY_STYLE = "'sha256-47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU='"  # sha256 of ""
APP_POLICY = f"default-src 'self'; style-src 'self' {_EMPTY_STYLE}; img-src 'self' data:; {_COMMON}"
_CDN = "https://cdn.jsdelivr.net"
_INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


def docs_policy(page: bytes) -> str:
    """The policy of an API docs page: its CDN assets and its own inline scripts, by hash."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(page)
    )
    return (
        f"default-src 'self'; script-src 'self' {_CDN} {hashes}; "
        f"style-src 'self' 'unsafe-inline' {_CDN} https://fonts.googleapis.com; "
        "font-src 'self' https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com; "
        f"worker-src 'self' blob:; {_COMMON}"
    )


class SecurityHeaders:
    """Pure ASGI middleware adding the three headers to every HTTP answer that lacks them."""

    HEADERS = (
        (b"content-security-policy", APP_POLICY.encode()),
        (b"x-frame-options", b"DENY"),
        (b"x-content-type-options", b"nosniff"),
    )

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {bytes(name).lower() for name, _value in headers}
                headers += [(name, value) for name, value in self.HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
