"""The app factory: ``create_app(settings)`` with a lifespan that starts and closes the engine."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi_offline import FastAPIOffline
from starlette.routing import BaseRoute

from reranker.backends import LabelLogprobBackend
from service.engine import Engine
from service.errors import install_error_handlers
from service.metrics import Metrics, MetricsMiddleware
from service.retrieval import RetrievalStage
from service.routes import router
from service.security import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    DisconnectMiddleware,
    MediaTypeMiddleware,
)
from service.settings import Settings, load_settings

log = logging.getLogger(__name__)

VERSION = "0.1.0"


def create_app(settings: Settings | None = None, engine: Engine | None = None,
               retrieval: RetrievalStage | None = None,
               reranker_backend: LabelLogprobBackend | None = None) -> FastAPI:
    """The HTTP app over an engine: the one its lifespan starts from ``settings``, or ``engine``,
    already started by the caller (``rankd serve`` does, to report a bad configuration in one
    line), which the caller also closes. ``retrieval`` and ``reranker_backend`` hand the
    lifespan's engine stages that run elsewhere (Engine.start)."""
    settings = settings or (engine.settings if engine else load_settings())
    metrics = engine.metrics if engine else Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = engine is None
        running = (await Engine.start(settings, metrics, retrieval, reranker_backend)
                   if engine is None else engine)
        app.state.engine = running
        log.info("rankd ready: %d collections, reranker %s", len(running.collections_loaded),
                 settings.reranker.backend)
        try:
            yield
        finally:
            if owned:
                await running.close()

    # Swagger UI and ReDoc from the assets installed with fastapi-offline, not from a CDN, so
    # /docs works on a machine without internet.
    app = FastAPIOffline(
        title="rankd",
        version=VERSION,
        # A redirect to the slash-less path would be built from the client's Host header.
        redirect_slashes=False,
        summary="Two-stage retrieve-and-rerank: embeddings + FAISS, then a listwise LLM reranker.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    install_error_handlers(app)
    # Added innermost first, so a request passes metrics, CORS, the API key, the media type,
    # then the body limit: the refusals of the last three are counted.
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes,
                       read_timeout_s=settings.body_timeout_s)
    app.add_middleware(MediaTypeMiddleware)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)
    if settings.cors_origin_list:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def routes() -> Sequence[BaseRoute]:
        # rankd's own routes first: the app lists an included router as one opaque entry.
        return [*router.routes, *app.router.routes]

    app.add_middleware(DisconnectMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=routes)
    app.include_router(router)
    return app
