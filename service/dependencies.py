"""Typed accessors for what the lifespan put on ``app.state``.

They are ``async def`` so FastAPI calls them on the event loop instead of a thread-pool hop.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.components import Components
from service.metrics import Metrics
from service.ranking import RankService
from service.settings import Settings


async def _components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


async def _rank_service(request: Request) -> RankService:
    service: RankService = request.app.state.rank_service
    return service


async def _metrics(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


ComponentsDep = Annotated[Components, Depends(_components)]
RankServiceDep = Annotated[RankService, Depends(_rank_service)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
SettingsDep = Annotated[Settings, Depends(_settings)]
