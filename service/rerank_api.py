"""POST /v1/rerank (also /rerank and /v2/rerank): Cohere/Jina-compatible document reranking.

The caller sends the documents; nothing is retrieved. Scoring goes through the same listwise,
order-averaged scorer as /rank.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from reranker import BackendError, ListwiseScorer, ListwiseTask
from reranker.listwise import MAX_ORDERS
from reranker.windows import balanced_windows, merge_window_scores
from service.components import Components
from service.errors import LimitExceededError, RerankUnavailableError
from service.schemas import ErrorBody


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: StrictStr


class RerankRequest(BaseModel):
    # Extra fields are accepted and ignored: SDKs send options (rank_fields, max_chunks_per_doc,
    # ...) that have no meaning here. `model` is never loaded: the reranker is fixed at start-up.
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    query: StrictStr
    documents: list[StrictStr | TextDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True)
    return_documents: bool = Field(False, strict=True)
    orders: int | None = Field(None, ge=1, le=MAX_ORDERS, strict=True,
                               description="Orders each window's prompt runs in (see /rank); default RANKD_RERANK_ORDERS.")

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or whitespace")
        return value


class RerankDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())
    id: str
    model: str
    results: list[RerankResult]
    meta: dict[str, object]
    usage: dict[str, int]


async def _scorer(request: Request) -> ListwiseScorer:
    components: Components = request.app.state.components
    if components.scorer is None:
        raise RerankUnavailableError(
            "no reranker is configured (RANKD_RERANKER_BACKEND=none); set RANKD_RERANKER_BACKEND "
            "and RANKD_RERANKER_MODEL to use this endpoint")
    return components.scorer


async def _components(request: Request) -> Components:
    components: Components = request.app.state.components
    return components


ScorerDep = Annotated[ListwiseScorer, Depends(_scorer)]
ComponentsDep = Annotated[Components, Depends(_components)]

router = APIRouter(tags=["rerank"])
_ERRORS: dict[int | str, dict[str, object]] = {
    status: {"model": ErrorBody} for status in (400, 401, 413, 422, 429, 503)}


@router.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_ERRORS)
@router.post("/v2/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_ERRORS)
@router.post("/rerank", response_model=RerankResponse, response_model_exclude_none=True,
             responses=_ERRORS)
async def rerank(body: RerankRequest, scorer: ScorerDep,
                 components: ComponentsDep) -> RerankResponse:
    """Rerank the given documents for the query, best first; `index` refers to the input list."""
    settings = components.settings
    started = time.perf_counter()
    if len(body.query) > settings.max_query_chars:
        raise LimitExceededError(
            f"query is {len(body.query)} characters, over the limit of "
            f"{settings.max_query_chars} (RANKD_MAX_QUERY_CHARS)", "query")
    if len(body.documents) > settings.max_rerank_documents:
        raise LimitExceededError(
            f"documents holds {len(body.documents)} items, over the limit of "
            f"{settings.max_rerank_documents} (RANKD_MAX_RERANK_DOCUMENTS)", "documents")
    texts = [d if isinstance(d, str) else d.text for d in body.documents]
    for i, text in enumerate(texts):
        if len(text) > settings.max_document_chars:
            raise LimitExceededError(
                f"documents[{i}] is {len(text)} characters, over the limit of "
                f"{settings.max_document_chars} (RANKD_MAX_DOCUMENT_CHARS)", f"documents[{i}]")
    windows = balanced_windows(len(texts), scorer.max_items)
    tasks = [
        ListwiseTask(
            template=settings.rerank_prompt_template,
            fields={"instruction": settings.rerank_instruction, "query": body.query},
            items=[texts[i] for i in window],
            item_ids=[str(i) for i in window],
            orders=body.orders,
        )
        for window in windows
    ]
    try:
        scored = await scorer.score(tasks)
    except BackendError as exc:
        components.metrics.rerank_failures.labels(exc.reason).inc()
        raise RerankUnavailableError(f"the reranker failed ({exc.reason}): {exc}") from exc
    scores = merge_window_scores(windows, [s.probabilities for s in scored])
    order = sorted(range(len(texts)), key=lambda i: -scores[i])
    if body.top_n is not None:
        order = order[: body.top_n]
    components.metrics.stage_latency.labels("rerank").observe(time.perf_counter() - started)
    return RerankResponse(
        id=str(uuid.uuid4()),
        model=settings.reranker_model or "",
        results=[
            RerankResult(index=i, relevance_score=scores[i],
                         document=RerankDocument(text=texts[i]) if body.return_documents else None)
            for i in order
        ],
        meta={"api_version": {"version": "2"}, "billed_units": {"search_units": 1}},
        usage={"search_units": 1, "documents": len(texts), "windows": len(windows)},
    )
