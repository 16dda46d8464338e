"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


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
    debug: bool = Field(False, description="Return the exact prompts, label token ids and per-order probabilities.")

    _query_not_blank = field_validator("query")(_not_blank)


class RankBatchRequest(_Strict):
    queries: list[RankRequest] = Field(min_length=1, description="Queries, answered in order (at most RANKD_MAX_BATCH_QUERIES).")


class RankResult(BaseModel):
    id: str
    text: str
    score: float = Field(description="Reranked: the mean label probability over both orders (0 for candidates beyond those reranked). Otherwise the retrieval score.")
    retrieval_score: float = Field(description="Inner product of unit embeddings (cosine similarity).")
    rank: int


class Timings(BaseModel):
    retrieve: float
    rerank: float | None
    total: float


class OrderDebug(BaseModel):
    prompt: str
    labels: list[str]
    label_token_ids: list[int]
    candidate_ids: list[str]
    probabilities: list[float]


class RankDebug(BaseModel):
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
