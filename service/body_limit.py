"""A size limit on request bodies, enforced as they arrive instead of after they are read.

Starlette reads a JSON body whole, and ``json.loads`` then needs several times its size: a
200 MB body cost about 700 MB before its 422. :class:`BodyLimit` answers 413 before reading
a body whose ``Content-Length`` is over the limit, and counts the chunks of a body sent
without one (``Transfer-Encoding: chunked``), failing the read with 413 as soon as the count
passes it; so a request holds at most the limit plus one chunk. Multipart uploads to the
upload routes (models, data sets) are exempt: ``service.uploads`` streams them to disk under
their own limit, ``Settings.max_upload_bytes``.
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import HTTPException, status
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit"]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return None


class BodyLimit:
    """Pure ASGI middleware: request bodies over ``max_bytes`` end in 413 (see the module doc).

    Args:
        app: the application.
        max_bytes: the largest body accepted (``Settings.max_json_body_bytes``).
        upload_paths: paths whose ``multipart/form-data`` POSTs are uploads with their own limit.
    """

    def __init__(self, app: ASGIApp, *, max_bytes: int, upload_paths: Collection[str]) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_paths = frozenset(upload_paths)

    def _too_large(self) -> str:
        return (
            f"request body larger than {self.max_bytes} bytes (MODELTAILOR_MAX_JSON_BODY_BYTES); "
            "upload models and data sets as multipart/form-data"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._is_upload(scope):
            await self.app(scope, receive, send)
            return
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.max_bytes):
            # Refused unread; closing the connection spares reading the rest of it.
            refusal = JSONResponse(
                {"detail": self._too_large()},
                status_code=status.HTTP_413_CONTENT_TOO_LARGE,
                headers={"Connection": "close"},
            )
            await refusal(scope, receive, send)
            return
        received = 0
        over = False

        async def counted() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    # An HTTPException: FastAPI re-raises it from its body parsing, so the app's
                    # exception handling answers 413 (routes reading the body themselves too).
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, self._too_large())
            return message

        async def closing(message: Message) -> None:
            if over and message["type"] == "http.response.start":
                # The client may still be sending: close instead of reading the rest.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, counted, closing)

    def _is_upload(self, scope: Scope) -> bool:
        path = str(scope.get("path", "")).removeprefix(str(scope.get("root_path", "")))
        content_type = (_header(scope, b"content-type") or "").lower()
        return (
            scope.get("method") == "POST"
            and path in self.upload_paths
            and content_type.startswith("multipart/form-data")
        )
