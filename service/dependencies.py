"""The typed dependencies of the routes: the engine and the metrics the app was built with.

They are ``async def`` so FastAPI calls them on the event loop instead of a thread-pool hop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.engine import Engine
from service.metrics import Metrics


async def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


EngineDep = Annotated[Engine, Depends(_engine)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
