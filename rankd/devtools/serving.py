"""The real app behind uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from service.app import create_app
from service.server import server_config
from service.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serve_in_thread(settings: Settings, **uvicorn_options: Any) -> Iterator[str]:
    """The real app behind uvicorn as `rankd serve` configures it (service/server.py), on a
    free loopback port, in a background thread."""
    loopback = settings.model_copy(update={"host": "127.0.0.1", "port": free_port()})
    options = {"log_level": "warning", **uvicorn_options}
    with _serve(server_config(create_app(settings), loopback, **options)) as url:
        yield url


@contextlib.contextmanager
def serve_asgi_in_thread(app: Any, **uvicorn_options: Any) -> Iterator[str]:
    """Any ASGI app (e.g. the real app behind a test middleware) on a free loopback port."""
    options = {"log_level": "warning", **uvicorn_options}
    with _serve(uvicorn.Config(app, host="127.0.0.1", port=free_port(), **options)) as url:
        yield url


@contextlib.contextmanager
def _serve(config: uvicorn.Config) -> Iterator[str]:
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://{config.host}:{config.port}"
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("rankd test server did not start")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
