"""Run the real app in-process, lifespan included; on a loopback port, rankd/devtools/serving.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI

from clients.api import parse_prometheus
from rankd.devtools.ports import free_port
from rankd.devtools.serving import serve_asgi_in_thread, serve_in_thread
from service.app import create_app
from service.settings import Settings


@contextlib.asynccontextmanager
async def app_client(settings: Settings) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan run, and an httpx client speaking ASGI to it."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rankd.test",
                                     timeout=120) as client:
            yield app, client


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    return parse_prometheus(text).get((name, frozenset(labels.items())), 0.0)


async def wait_for(predicate: Any, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.1)


__all__ = ["app_client", "free_port", "metric_value", "serve_asgi_in_thread", "serve_in_thread",
           "wait_for"]
