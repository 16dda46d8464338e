"""Request guards that run before routing: the API key, the body's media type and its size.

Both are pure ASGI so that they cover every route, the OpenAPI pages included, and answer with
the same JSON errors as the rest of the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    BodyTooLargeError,
    RequestTimeoutError,
    UnauthorizedError,
    UnsupportedMediaTypeError,
    error_response,
)
from service.metrics import CLIENT_GONE

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


class MediaTypeMiddleware:
    """Request bodies are JSON: a body sent as another media type, or compressed, is a 415 that
    says what to send, not a validation error about its bytes. No Content-Type is taken for
    JSON, as clients that send JSON without saying so are common."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    @staticmethod
    def _problem(headers: dict[bytes, bytes]) -> str | None:
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if kind and kind != b"application/json" and not kind.endswith(b"+json"):
            return (f"Content-Type {kind.decode('latin-1')!r} is not JSON: send "
                    "`Content-Type: application/json`")
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding not in (b"", b"identity"):
            return (f"Content-Encoding {encoding.decode('latin-1')!r} is not accepted: send the "
                    "body uncompressed")
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            headers = dict(scope["headers"])
            problem = self._problem(headers)
            if problem:
                response = error_response(UnsupportedMediaTypeError(problem, "Content-Type"))
                await response(scope, receive, send)
                return
            if b"content-type" not in headers:
                scope = {**scope, "headers": [*scope["headers"],
                                              (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# The rest of a refused body is not read: its connection cannot carry another request.
CLOSE = {"Connection": "close"}


class _BodyTooLargeSignal(StarletteHTTPException):
    """Raised while the body streams in; FastAPI re-raises HTTP exceptions from body reading, so
    the app's HTTP error handler turns it into the JSON 413."""


class _BodyStalledSignal(StarletteHTTPException):
    """Raised when the body stops arriving for longer than its timeout."""


class BodyLimitMiddleware:
    """Refuses bodies over ``limit`` bytes, by Content-Length up front or while streaming, and
    bodies that stall for ``read_timeout_s`` between two parts (408)."""

    def __init__(self, app: ASGIApp, limit: int, read_timeout_s: float = 30.0) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s

    def _error(self) -> BodyTooLargeError:
        return BodyTooLargeError(
            f"request body exceeds {self.limit} bytes (RANKD_MAX_BODY_BYTES)", "body")

    def _stalled(self) -> RequestTimeoutError:
        return RequestTimeoutError(
            f"the request body stopped arriving for {self.read_timeout_s:g} s "
            "(RANKD_BODY_TIMEOUT_S)", "body")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await error_response(self._error())(scope, receive, send)
            return
        received = 0
        complete = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, complete
            if complete:  # the body is in: what comes now is the client's disconnect
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.read_timeout_s)
            except TimeoutError:
                raise _BodyStalledSignal(408, str(self._stalled()), CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLargeSignal(413, str(self._error()), CLOSE)
                complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (_BodyTooLargeSignal, _BodyStalledSignal) as signal:
            if started:
                raise
            error = self._error() if isinstance(signal, _BodyTooLargeSignal) else self._stalled()
            await error_response(error, CLOSE)(scope, receive, send)


class DisconnectMiddleware:
    """Stops the work of a request whose client has gone, as vLLM aborts a request.

    The app runs as a task; once it has read the body, the connection is watched, and a
    disconnect cancels the task, which drops the request's prompts still queued for the
    reranker. A client that leaves while its body is still arriving ends the request the same
    way. Such requests are counted with status 499 (the client closed the request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body_done = asyncio.Event()
        gone = asyncio.Event()  # the client left before its answer was complete
        answered = False

        def disconnected() -> None:
            if not answered:  # after the answer, a disconnect is the connection's normal end
                gone.set()

        async def tracked_receive() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected()
            elif not message.get("more_body", False):
                body_done.set()
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal answered
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True

        async def watch() -> None:
            await body_done.wait()
            while not gone.is_set() and not answered:
                if (await receive())["type"] == "http.disconnect":
                    disconnected()
                    return

        app = asyncio.ensure_future(self.app(scope, tracked_receive, tracked_send))
        watcher = asyncio.ensure_future(watch())
        stopped = asyncio.ensure_future(gone.wait())
        try:
            await asyncio.wait([app, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            stopped.cancel()
        if gone.is_set():
            scope.setdefault("state", {})[CLIENT_GONE] = True
            if not app.done():
                app.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await app
            return
        app.result()  # the app's own exception, if any, goes on to the server

