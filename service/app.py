"""The app factory: ``create_app(settings)`` with a lifespan that loads and closes components."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.components import Components
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.ranking import RankService
from service.routes import router
from service.settings import Settings, load_settings

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or load_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        components = await Components.start(settings, metrics)
        app.state.components = components
        app.state.rank_service = RankService(components)
        log.info("rankd ready: %d collections, reranker %s", len(components.collections),
                 settings.reranker_backend)
        try:
            yield
        finally:
            await components.close()

    app = FastAPI(
        title="rankd",
        version=VERSION,
        summary="Two-stage retrieve-and-rerank: embeddings + FAISS, then a listwise LLM reranker.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.include_router(router)
    return app
