"""Request guards that run before routing: the API key and the request body size limit.

Both are pure ASGI so that they cover every route, the OpenAPI pages included, and answer with
the same JSON errors as the rest of the API.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import BodyTooLargeError, UnauthorizedError, error_response

PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics"})


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self._keys = [key.encode() for key in keys]

    def _authorised(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != b"bearer":
            return False
        # Compare against every key, without stopping early, in constant time per key.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token.strip(), key)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS:
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        if not self._authorised(header):
            reason = "missing" if not header else "wrong"
            response = error_response(UnauthorizedError(
                f"{reason} API key: send `Authorization: Bearer <key>`", "Authorization"))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _BodyTooLargeSignal(StarletteHTTPException):
    """Raised while the body streams in; FastAPI re-raises HTTP exceptions from body reading, so
    the app's HTTP error handler turns it into the JSON 413."""


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes, by Content-Length up front or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    def _error(self) -> BodyTooLargeError:
        return BodyTooLargeError(
            f"request body exceeds {self.limit} bytes (RANKD_MAX_BODY_BYTES)", "body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeSignal(413, str(self._error()))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeSignal:
            if started:
                raise
            await error_response(self._error())(scope, receive, send)
