"""HTTP routes. Thin: validation of limits and all work live in the services they call."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.dependencies import ComponentsDep, MetricsDep, RankServiceDep
from service.errors import LimitExceededError
from service.schemas import (
    CollectionInfo,
    ComponentStatus,
    ErrorBody,
    RankBatchRequest,
    RankRequest,
    RankResponse,
    ReadyResponse,
)

router = APIRouter()

_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in [
        (400, "Malformed JSON"),
        (401, "Missing or wrong API key"),
        (404, "Unknown collection"),
        (413, "Request body too large"),
        (422, "Invalid field or a value over a configured limit"),
        (429, "Overloaded: retry after the Retry-After header"),
        (503, "Not ready, or the reranker is required and unavailable"),
    ]
}


@router.post("/rank", response_model=RankResponse, responses=_ERRORS, tags=["rank"])
async def rank(body: RankRequest, service: RankServiceDep) -> RankResponse:
    """Retrieve candidates for one query and rerank them."""
    return await service.rank(body)


@router.post("/rank/batch", response_model=list[RankResponse], responses=_ERRORS, tags=["rank"])
async def rank_batch(body: RankBatchRequest, service: RankServiceDep) -> list[RankResponse]:
    """Several queries in one request; answers come back in order."""
    limit = service.settings.max_batch_queries
    if len(body.queries) > limit:
        raise LimitExceededError(
            f"queries holds {len(body.queries)} items, over the limit of {limit} "
            "(RANKD_MAX_BATCH_QUERIES)", "queries")
    return await service.rank_many(body.queries)


@router.get("/health", tags=["ops"])
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", response_model=ReadyResponse, tags=["ops"],
            responses={503: {"model": ReadyResponse, "description": "Not ready"}})
async def ready(components: ComponentsDep) -> JSONResponse:
    """Readiness with a status per component: embedder, each collection, reranker."""
    statuses: dict[str, ComponentStatus] = {
        "embedder": ComponentStatus(status="ok", detail=components.embedder.name),
    }
    for name, collection in components.collections.items():
        statuses[f"collection:{name}"] = ComponentStatus(
            status="ok", detail=f"{len(collection)} entries")
    for name, error in components.collection_errors.items():
        statuses[f"collection:{name}"] = ComponentStatus(status="error", detail=error)
    if components.scorer is None:
        statuses["reranker"] = ComponentStatus(
            status="disabled", detail="RANKD_RERANKER_BACKEND=none: retrieval order only")
    else:
        problem = await components.scorer.health()
        statuses["reranker"] = ComponentStatus(
            status="degraded" if problem else "ok",
            detail=problem or f"backend {components.scorer.backend_name}, model "
                                  f"{components.scorer.model}")
    if not components.collections:
        statuses["collections"] = ComponentStatus(
            status="error",
            detail=f"no collection loaded from {components.settings.index_dir}")
        overall = "not_ready"
    elif any(s.status in ("degraded", "error") for s in statuses.values()):
        overall = "degraded"
    else:
        overall = "ready"
    body = ReadyResponse(status=overall, components=statuses)
    return JSONResponse(body.model_dump(), status_code=503 if overall == "not_ready" else 200)


@router.get("/collections", response_model=list[CollectionInfo], tags=["ops"])
async def collections(components: ComponentsDep) -> list[CollectionInfo]:
    """Loaded collections with their size, embedder and build time."""
    return [
        CollectionInfo(name=c.name, count=len(c), embedder=c.manifest.embedder,
                       dimension=c.manifest.dimension, index_kind=c.manifest.index_kind,
                       built_at=c.manifest.created_at, instruction=c.manifest.instruction)
        for c in components.collections.values()
    ]


@router.get("/metrics", tags=["ops"], response_class=Response)
async def metrics(metrics: MetricsDep) -> Response:
    """Prometheus metrics."""
    return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
