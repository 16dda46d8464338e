"""uvicorn as `rankd serve` runs it: h11, with the request head bounded in size and in time.

httptools, uvicorn's default parser, accepts a request head of any size (a 64 MB header was
read whole), and uvicorn has no deadline for a head that arrives a byte at a time. h11 bounds the
head's size (``h11_max_incomplete_event_size``, RANKD_MAX_HEADER_BYTES: 400 and closed beyond),
and ``BoundedH11Protocol`` gives every connection RANKD_HEADER_TIMEOUT_S to send a complete
head, from its start or from the end of the previous response (408 and closed after). Both act
before the API key is checked, so a client without a key cannot hold a connection either. The
body's own limits (size, stalls) are the app's (service/security.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    header_timeout_s = 10.0  # set per server by ``server_config``

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # the head is in
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_deadline()  # the next request's head on a kept-alive connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        body = json.dumps({"error": {
            "code": "request_timeout", "field": "headers",
            "message": f"the request head was not complete within {self.header_timeout_s:g} s "
                       "(RANKD_HEADER_TIMEOUT_S)"}}).encode()
        # No request was read, so h11 has nothing to answer: the 408 is written as it is.
        self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                             b"connection: close\r\ncontent-length: " + str(len(body)).encode()
                             + b"\r\n\r\n" + body)
        self.transport.close()


def server_config(app: Any, settings: Settings, **options: Any) -> uvicorn.Config:
    """The uvicorn configuration of `rankd serve` for ``app``."""
    protocol = type("RankdH11Protocol", (BoundedH11Protocol,),
                    {"header_timeout_s": settings.header_timeout_s})
    values: dict[str, Any] = {"log_level": settings.log_level, **options}
    return uvicorn.Config(app, host=settings.host, port=settings.port, http=protocol,
                          h11_max_incomplete_event_size=settings.max_header_bytes, **values)
