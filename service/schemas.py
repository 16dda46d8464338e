"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from reranker.fusion import Fusion


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class _Strict(BaseModel):
    # Wrong types are errors, not coercions, and unknown fields are typos worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


class RankRequest(_Strict):
    query: str = Field(description="The query text, e.g. a student's wrong answer with its question.")
    collection: str | None = Field(None, description="Collection to search; may be omitted when exactly one is loaded.")
    top_k: int = Field(25, ge=1, description="Results to return (at most RANKD_MAX_TOP_K).")
    candidates: int | None = Field(None, ge=1, description="Retrieved candidates passed to the reranker (default RANKD_DEFAULT_CANDIDATES).")
    rerank: bool = Field(True, description="Rerank the candidates with the LLM when a reranker is configured.")
    orders: int | None = Field(None, ge=1, description="Orders each prompt runs in: 1 (retrieval order), 2 (and reversed), k >= 3 (k cyclic rotations, at most one per candidate); default RANKD_RERANK_ORDERS.")
    fusion: Fusion | None = Field(None, strict=False, description="Fuse the rerank scores with the retrieval order: none, rrf or linear; default RANKD_RERANK_FUSION.")
    fusion_weight: float | None = Field(None, ge=0, le=1, description="The retrieval's weight in rrf and linear fusion; default RANKD_RERANK_FUSION_WEIGHT.")
    debug: bool = Field(False, description="Return the exact prompts, label token ids and per-order probabilities.")

    _query_not_blank = field_validator("query")(_not_blank)


class RankBatchRequest(_Strict):
    queries: list[RankRequest] = Field(min_length=1, description="Queries, answered in order (at most RANKD_MAX_BATCH_QUERIES).")


class RankResult(BaseModel):
    id: str
    text: str
    score: float = Field(description="Reranked: the final score, which orders the results: the mean label probability over the orders, or its fusion with the retrieval order (0 for candidates beyond those reranked). Otherwise the retrieval score.")
    retrieval_score: float = Field(description="Inner product of unit embeddings (cosine similarity).")
    rank: int
    rerank_score: float | None = Field(None, description="Reranked candidates: the mean label probability over the orders.")
    order_spread: float | None = Field(None, description="Reranked candidates: max - min of the candidate's label probability across the orders; large when the model's choice depends on position.")


class Timings(BaseModel):
    retrieve: float
    rerank: float | None
    total: float


class OrderDebug(BaseModel):
    positions: list[int] = Field(description="For each label, the retrieval rank (0-based) of the candidate behind it.")
    prompt: str
    labels: list[str]
    label_token_ids: list[int]
    candidate_ids: list[str]
    probabilities: list[float]


class RankDebug(BaseModel):
    fusion: str
    fusion_weight: float
    orders: list[OrderDebug]


class RankResponse(BaseModel):
    collection: str
    results: list[RankResult]
    reranked: bool
    timings_ms: Timings
    warnings: list[str] = Field(default_factory=list)
    debug: RankDebug | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class CollectionInfo(BaseModel):
    name: str
    count: int
    embedder: str
    dimension: int
    index_kind: str
    built_at: str
    instruction: str | None


class ComponentStatus(BaseModel):
    status: str = Field(description="ok, degraded, disabled or error")
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: str = Field(description="ready, degraded or not_ready")
    components: dict[str, ComponentStatus]
