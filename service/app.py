"""The app factory: ``create_app(settings)`` with a lifespan that loads and closes components."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from service.answer import router as answer_router
from service.components import Components
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.ranking import RankService
from service.rerank_api import router as rerank_router
from service.routes import router
from service.security import ApiKeyMiddleware, BodyLimitMiddleware
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
    # Added innermost first: requests pass CORS, then the API key, then the body limit, then
    # metrics, so refused requests are counted too.
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.include_router(router)
    app.include_router(rerank_router)
    app.include_router(answer_router)
    return app
