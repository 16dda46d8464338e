"""The HTTP routes: each one an adapter that hands its typed body to the engine and returns the
engine's typed answer. Their OpenAPI error responses come from the one error table."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from reranker.errors import TooManyItemsError
from retriever.vocabulary import CollectionUnavailableError
from runtime.batching import QueueFullError
from service.dependencies import EngineDep, MetricsDep
from service.errors import (
    CollectionRequiredError,
    LimitExceededError,
    NotReadyError,
    RerankUnavailableError,
    UnknownCollectionError,
    responses_for,
)
from service.protocol import (
    AnswerRequest,
    AnswerResponse,
    CollectionInfo,
    RankBatchRequest,
    RankRequest,
    RankResponse,
    ReadyResponse,
    RerankRequest,
    RerankResponse,
)

router = APIRouter()

_RANK_ERRORS = responses_for(LimitExceededError, TooManyItemsError, UnknownCollectionError,
                             CollectionRequiredError, QueueFullError, NotReadyError,
                             RerankUnavailableError, CollectionUnavailableError)
_RERANK_ERRORS = responses_for(LimitExceededError, QueueFullError, RerankUnavailableError)
_ANSWER_ERRORS = responses_for(LimitExceededError, TooManyItemsError, UnknownCollectionError,
                               CollectionRequiredError, QueueFullError, NotReadyError,
                               RerankUnavailableError, CollectionUnavailableError)


@router.post("/rank", response_model=RankResponse, responses=_RANK_ERRORS, tags=["rank"])
async def rank(body: RankRequest, engine: EngineDep) -> RankResponse:
    """Retrieve candidates for one query and rerank them."""
    return await engine.rank(body)


@router.post("/rank/batch", response_model=list[RankResponse], responses=_RANK_ERRORS,
             tags=["rank"])
async def rank_batch(body: RankBatchRequest, engine: EngineDep) -> list[RankResponse]:
    """Several queries in one request; answers come back in order."""
    return await engine.rank_many(body.queries)


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_RERANK_ERRORS, tags=["rerank"])
@router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_RERANK_ERRORS, tags=["rerank"])
@router.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_RERANK_ERRORS, tags=["rerank"])
async def rerank(body: RerankRequest, engine: EngineDep) -> RerankResponse:
    """Cohere/Jina-compatible: rerank the given documents for the query, best first; `index`
    refers to the input list."""
    return await engine.rerank(body)


@router.post("/answer", response_model=AnswerResponse, responses=_ANSWER_ERRORS,
             tags=["answer"])
async def answer(body: AnswerRequest, engine: EngineDep) -> AnswerResponse:
    """Pick the answer of a multiple-choice question: option probabilities averaged over the
    option orders, with retrieved or supplied context."""
    return await engine.answer(body)


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyResponse, tags=["ops"],
            responses={503: {"model": ReadyResponse, "description": "Not ready"}})
async def ready(engine: EngineDep) -> JSONResponse:
    """Readiness with a status per component: embedder, each collection, reranker."""
    body = await engine.ready()
    return JSONResponse(body.model_dump(), status_code=503 if body.status == "not_ready" else 200)


@router.get("/collections", response_model=list[CollectionInfo], tags=["ops"])
async def collections(engine: EngineDep) -> list[CollectionInfo]:
    """Loaded collections with their size, embedder and build time."""
    return engine.collections()


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
