"""The real app behind uvicorn on a free loopback port, in a background thread."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn

from rankd.devtools.ports import free_port
from service.app import create_app
from service.server import server_config
from service.settings import Settings


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


def start_child(command: list[str], env: dict[str, str], ready_url: str, what: str,
                timeout_s: float = 300.0) -> subprocess.Popen[bytes]:
    """A server in a child process, once ``ready_url`` answers 200; its stderr is kept for the
    error when it exits or does not become ready in time."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            error = process.stderr.read().decode()[-3000:] if process.stderr else ""
            raise RuntimeError(f"{what} exited: {error}")
        try:
            if httpx.get(ready_url, timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError(f"{what} did not become ready within {timeout_s:.0f} s")

