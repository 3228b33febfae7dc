"""Request bodies within a size and a time limit, read before the application sees them (pure ASGI middleware).

Without it a 100 MB body was read and parsed before its 413, and an upload that stalled held its connection and
its place in ``sora_inflight_requests`` for ever, and a SIGTERM drain until the graceful timeout. FastAPI's
``max_body_size`` counts bytes but sets no time limit, and its 413 keeps the connection, so the server still reads
(and drops) the rest of the body.
"""

from __future__ import annotations

import asyncio

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class _Refused(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class BodyLimits:
    """413 past ``max_bytes`` (by Content-Length before reading a byte, or as chunks arrive), 408 when the whole
    body has not arrived ``timeout_s`` after the request's head; both close the connection, whose rest is unread.
    A client that leaves mid-body gets no answer (the metrics count it as 499)."""

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float):
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if "content-length" not in headers and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)  # no body
            return
        try:
            body = await self._read(headers, receive)
        except _Refused as refused:
            response = JSONResponse({"detail": refused.detail}, refused.status, headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        if body is None:  # the client went away: no one to answer
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # http.disconnect, when it comes
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, headers: Headers, receive: Receive) -> bytes | None:
        """The whole body, or None if the client disconnected first."""
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            raise _Refused(413, f"request body too large: Content-Length {length} > max_body_bytes {self.max_bytes}")
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_bytes:
                        raise _Refused(413, f"request body too large: over max_body_bytes {self.max_bytes}")
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            raise _Refused(408, f"request body not received within body_timeout_s {self.timeout_s:g} s") from None
