"""Every request and response body of the API, in one place. The engine (service/engine.py)
takes and returns these; the routes only move them across HTTP.

Text fields are ``Text``: a string that must be valid Unicode. JSON may carry a lone surrogate
(``"\\ud800"``), which Python decodes into a ``str`` that no tokenizer or UTF-8 encoder accepts;
it is refused here, with the field named, before it reaches a model.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, model_validator

from reranker.config import MAX_ORDERS
from reranker.fusion import Fusion
from reranker.labels import MAX_LABELS

MAX_OPTIONS = MAX_LABELS  # the largest alphabet's; the configured one may allow fewer

_SURROGATE = re.compile("[\ud800-\udfff]")


def _valid_unicode(value: str) -> str:
    found = _SURROGATE.search(value)
    if found is not None:
        raise ValueError(f"contains a lone surrogate (U+{ord(found.group()):04X}) at character "
                         f"{found.start()}: send valid Unicode (UTF-8)")
    return value


def _not_blank(value: str) -> str:
    # Control and format characters (NUL, zero-width spaces and joiners, the BOM) render as
    # nothing: a query of only those is as empty as one of only spaces.
    if not any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf")
               for ch in value):
        raise ValueError("must not be empty, whitespace or invisible characters alone")
    return value


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
"""Any text field: valid Unicode."""
QueryText = Annotated[Text, AfterValidator(_not_blank)]
"""A query, question or option: valid Unicode with something in it."""


class _NullIsDefault(BaseModel):
    """An optional field sent as JSON ``null`` takes its default, as an omitted one does.

    Wrappers over the Cohere SDK, and clients generated from other APIs' schemas, pass an option
    the user left unset through as ``null``; Cohere's API accepts them, and so did rankd before
    ``max_tokens_per_doc`` existed. The null is dropped before validation, so the field is also
    absent from ``model_fields_set``: a null counts as "not set by the client". A required
    field's null is kept, and refused with the field named.
    """

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if not field.is_required()}
        return {key: value for key, value in data.items()
                if value is not None or key not in optional}


class _Strict(_NullIsDefault):
    # Wrong types are errors, not coercions, and unknown fields are typos worth reporting.
    model_config = ConfigDict(extra="forbid", strict=True)


# ------------------------------------------------------------------ /rank


class RankRequest(_Strict):
    query: QueryText = Field(description="The query text, e.g. a student's wrong answer with its question.")
    collection: Text | None = Field(None, description="Collection to search; may be omitted when exactly one is loaded.")
    top_k: int = Field(25, ge=1, description="Results to return (at most RANKD_MAX_TOP_K).")
    candidates: int | None = Field(None, ge=1, description="Retrieved candidates passed to the reranker (default RANKD_DEFAULT_CANDIDATES, at most the labels of RANKD_RERANKER_LABEL_ALPHABET).")
    rerank: bool = Field(True, description="Rerank the candidates with the LLM when a reranker is configured.")
    orders: int | None = Field(None, ge=1, le=MAX_ORDERS, description="Orders each prompt runs in: 1 (retrieval order), 2 (and reversed), k >= 3 (k cyclic rotations, at most one per candidate); default RANKD_RERANKER_ORDERS.")
    fusion: Fusion | None = Field(None, strict=False, description="Fuse the rerank scores with the retrieval order: consensus, rrf, linear or none; default RANKD_RERANKER_FUSION.")
    fusion_weight: float | None = Field(None, ge=0, le=1, description="The retrieval's weight in rrf, linear and consensus fusion; default RANKD_RERANKER_FUSION_WEIGHT.")
    debug: bool = Field(False, description="Return the exact prompts, label token ids and per-order probabilities.")


class RankBatchRequest(_Strict):
    queries: list[RankRequest] = Field(min_length=1, description="Queries, answered in order (at most RANKD_MAX_BATCH_QUERIES).")


class RankResult(BaseModel):
    id: str
    text: str
    score: float = Field(description="Reranked: the final score, which orders the results: the fusion of the rerank scores with the retrieval order (with fusion none, the mean label probability over the orders; 0 for candidates beyond those reranked). Otherwise the retrieval score.")
    retrieval_score: float = Field(description="Inner product of unit embeddings (cosine similarity).")
    rank: int
    rerank_score: float | None = Field(None, description="Reranked candidates: the mean label probability over the orders.")
    order_spread: float | None = Field(None, description="Reranked candidates: max - min of the candidate's label probability across the orders; large when the model's choice depends on position.")
    metadata: dict[str, object] = Field(default_factory=dict, description="The catalogue entry's metadata, as given at `rankd index build` (its other columns).")
    aliases: list[str] = Field(default_factory=list, description="Ids of the catalogue entries merged into this one at `rankd index build --dedup`: a query whose answer is one of them is answered by this entry.")


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


class FusionReport(BaseModel):
    """How much the reranker acted on this query's order."""

    method: str = Field(description="The fusion: none, rrf, linear or consensus.")
    rerank_weight: float = Field(description="The reranker's share of the fused score: 1 - the retrieval weight for rrf and linear, that times the agreement (0 if negative) for consensus, 1 for none.")
    agreement: float | None = Field(None, description="The orders' agreement, in [-1, 1]: the Spearman correlation of the candidates' probabilities between the orders. Near 1 when the model prefers the same candidates wherever they stand (it reads content), near 0 for noise, negative when it follows positions. null with one order or pointwise scoring.")
    moved: int = Field(description="Reranked candidates whose rank differs from their retrieval rank.")


class RankResponse(BaseModel):
    collection: str
    results: list[RankResult]
    reranked: bool
    timings_ms: Timings
    fusion: FusionReport | None = Field(None, description="Reranked queries: how much the reranker moved the retrieval order, and why.")
    warnings: list[str] = Field(default_factory=list)
    debug: RankDebug | None = None


# ------------------------------------------------------------------ /v1/rerank (Cohere, Jina)


class TextDocument(BaseModel):
    model_config = ConfigDict(extra="allow")
    text: Text


# Cohere's default for max_tokens_per_doc.
COHERE_MAX_TOKENS_PER_DOC = 4096


class RerankRequest(_NullIsDefault):
    # Extra fields are accepted and ignored: SDKs send options (rank_fields, max_chunks_per_doc,
    # ...) that have no meaning here. `model` is never loaded: the reranker is fixed at start-up.
    model_config = ConfigDict(extra="ignore", protected_namespaces=())
    model: Text | None = None
    query: QueryText
    documents: list[Text | TextDocument] = Field(min_length=1)
    top_n: int | None = Field(None, ge=1, strict=True)
    return_documents: bool = Field(False, strict=True)
    orders: int | None = Field(None, ge=1, le=MAX_ORDERS, strict=True,
                               description="Orders each window's prompt runs in (see /rank); default RANKD_RERANKER_ORDERS.")
    max_tokens_per_doc: int = Field(COHERE_MAX_TOKENS_PER_DOC, ge=1, strict=True,
                                    description="As Cohere's: each document is cut to at most this many tokens, then, where a prompt is still longer than the model reads, each document of the prompt to a fair share of the room (a shorter one's unused share goes to the longer ones). `meta.warnings` and `usage.truncated_documents` say what was cut. With RANKD_RERANKER_LONG_ITEMS=refuse nothing is cut and a prompt that is too long gets 422.")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


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


# ------------------------------------------------------------------ /answer


class AnswerRequest(_Strict):
    question: QueryText = Field(description="The question.")
    options: list[QueryText] = Field(min_length=2, max_length=MAX_OPTIONS, description="The answer options, labelled A, B, ... in this order; at most the labels of RANKD_RERANKER_LABEL_ALPHABET.")
    collection: Text | None = Field(None, description="Collection to retrieve passages from (ignored, with a warning, when `context` is given).")
    passages: int = Field(3, ge=0, description="Passages to retrieve (at most RANKD_MAX_ANSWER_PASSAGES); 0 for none.")
    context: list[Text] | None = Field(None, description="Passages supplied by the caller, best first; nothing is retrieved. They share RANKD_ANSWER_CONTEXT_TOKENS, counted as the prompt shows them (with their [n] markers).")
    orders: int | None = Field(None, ge=1, le=MAX_ORDERS, description="Orders the options run in (see /rank); default RANKD_RERANKER_ORDERS.")


class OptionScore(BaseModel):
    label: str
    index: int
    text: str
    probability: float


class Passage(BaseModel):
    id: str
    text: str
    score: float | None
    metadata: dict[str, object] = Field(default_factory=dict)


class AnswerTimings(BaseModel):
    retrieve: float
    answer: float
    total: float


class AnswerResponse(BaseModel):
    options: list[OptionScore]
    ranking: list[str]
    passages: list[Passage] = Field(description="The passages the prompt holds, best first, each as the model read it (cut to RANKD_ANSWER_CONTEXT_TOKENS); those that did not fit are left out.")
    timings_ms: AnswerTimings
    warnings: list[str] = Field(default_factory=list)


# ------------------------------------------------------------------ operations and errors


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
    backend: str = Field(description="faiss or milvus: where the vectors live")
    built_at: str
    instruction: str | None


class ComponentStatus(BaseModel):
    status: str = Field(description="ok, degraded, disabled or error")
    detail: str | None = None


class ReadyResponse(BaseModel):
    status: str = Field(description="ready, degraded or not_ready")
    components: dict[str, ComponentStatus]
