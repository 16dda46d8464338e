"""POST /answer: multiple-choice answering with retrieved (or supplied) context.

The retriever finds passages, and the listwise scorer reads the option labels' probabilities,
averaged over the caller's option order and its reverse: the same engine as /rank.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from reranker import BackendError, ListwiseScorer, ListwiseTask
from reranker.answer import fit_passages, format_context
from reranker.listwise import MAX_ORDERS
from retriever.search import SearchQuery
from service.components import Components
from service.errors import LimitExceededError, RerankUnavailableError
from service.ranking import RankService
from service.schemas import ErrorBody

MAX_OPTIONS = 26


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or whitespace")
    return value


class AnswerRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: StrictStr = Field(description="The question.")
    options: list[StrictStr] = Field(min_length=2, max_length=MAX_OPTIONS,
                                     description="The answer options, 2 to 26, labelled A, B, ... in this order.")
    collection: str | None = Field(None, description="Collection to retrieve passages from.")
    passages: int = Field(3, ge=0, description="Passages to retrieve (at most RANKD_MAX_ANSWER_PASSAGES); 0 for none.")
    context: list[StrictStr] | None = Field(None, description="Passages supplied by the caller, best first; nothing is retrieved.")
    orders: int | None = Field(None, ge=1, le=MAX_ORDERS, description="Orders the options run in (see /rank); default RANKD_RERANK_ORDERS.")

    _question_not_blank = field_validator("question")(_not_blank)

    @field_validator("options")
    @classmethod
    def _options_not_blank(cls, options: list[str]) -> list[str]:
        for i, option in enumerate(options):
            if not option.strip():
                raise ValueError(f"option {i} is empty or whitespace")
        return options


class OptionScore(BaseModel):
    label: str
    index: int
    text: str
    probability: float


class Passage(BaseModel):
    id: str
    text: str
    score: float | None


class AnswerTimings(BaseModel):
    retrieve: float
    answer: float
    total: float


class AnswerResponse(BaseModel):
    options: list[OptionScore]
    ranking: list[str]
    passages: list[Passage]
    timings_ms: AnswerTimings


async def _answer_components(request: Request) -> Components:
    components: Components = request.app.state.components
    if components.scorer is None:
        raise RerankUnavailableError(
            "/answer needs an LLM and no reranker is configured (RANKD_RERANKER_BACKEND=none); "
            "there is no meaningful retrieval-only answer")
    return components


async def _rank_service(request: Request) -> RankService:
    service: RankService = request.app.state.rank_service
    return service


AnswerComponentsDep = Annotated[Components, Depends(_answer_components)]
RankServiceDep = Annotated[RankService, Depends(_rank_service)]

router = APIRouter(tags=["answer"])


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


@router.post("/answer", response_model=AnswerResponse,
             responses={s: {"model": ErrorBody} for s in (400, 401, 404, 413, 422, 429, 503)})
async def answer(body: AnswerRequest, components: AnswerComponentsDep,
                 ranking: RankServiceDep) -> AnswerResponse:
    """Pick the answer: option probabilities averaged over both option orders."""
    settings = components.settings
    scorer: ListwiseScorer = components.scorer  # type: ignore[assignment]
    started = time.perf_counter()
    ranking.check_query(body.question, "question")
    scorer.check_count(len(body.options), "options")
    for i, option in enumerate(body.options):
        if len(option) > settings.max_document_chars:
            raise LimitExceededError(
                f"options[{i}] is {len(option)} characters, over the limit of "
                f"{settings.max_document_chars} (RANKD_MAX_DOCUMENT_CHARS)", f"options[{i}]")
    if body.passages > settings.max_answer_passages:
        raise LimitExceededError(
            f"passages is {body.passages}, over the limit of {settings.max_answer_passages} "
            "(RANKD_MAX_ANSWER_PASSAGES)", "passages")

    passages: list[Passage]
    if body.context is not None:
        passages = [Passage(id=f"context:{i}", text=t, score=None)
                    for i, t in enumerate(body.context)]
    elif body.passages:
        collection = ranking.resolve_collection(body.collection)
        query = body.question
        if settings.answer_query_with_options:
            query += "\n" + "\n".join(body.options)
        hits = await components.search_batcher.submit(
            SearchQuery(query, collection, body.passages))
        passages = [Passage(id=h.id, text=h.text, score=h.score) for h in hits]
    else:
        passages = []
    retrieved = time.perf_counter()

    context = fit_passages(scorer.renderer, [p.text for p in passages],
                           settings.answer_context_tokens)
    task = ListwiseTask(
        template=settings.answer_prompt_template,
        fields={"instruction": settings.answer_instruction, "context": format_context(context),
                "question": body.question},
        items=body.options,
        item_ids=scorer.labels[: len(body.options)],
        orders=body.orders,
    )
    try:
        (scored,) = await scorer.score([task])
    except BackendError as exc:
        components.metrics.rerank_failures.labels(exc.reason).inc()
        raise RerankUnavailableError(f"the LLM backend failed ({exc.reason}): {exc}") from exc
    answered = time.perf_counter()
    components.metrics.stage_latency.labels("answer").observe(answered - retrieved)

    options = sorted(
        (OptionScore(label=scorer.labels[i], index=i, text=text, probability=p)
         for i, (text, p) in enumerate(zip(body.options, scored.probabilities, strict=True))),
        key=lambda o: -o.probability,
    )
    return AnswerResponse(
        options=options,
        ranking=[o.label for o in options],
        passages=passages,
        timings_ms=AnswerTimings(retrieve=_ms(retrieved - started), answer=_ms(answered - retrieved),
                                 total=_ms(answered - started)),
    )
