"""A free loopback port. Standard library only: the fresh-start check uses it before any venv
exists."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
