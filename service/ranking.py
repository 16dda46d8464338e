"""POST /rank: retrieve candidates, rerank them listwise, and report both scores."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from reranker import BackendError, ListwiseScores, ListwiseTask
from reranker.fusion import Fusion, fuse
from reranker.listwise import MAX_ORDERS
from retriever.index import Hit
from retriever.search import SearchQuery
from service.components import Components
from service.errors import (
    CollectionRequiredError,
    LimitExceededError,
    NotReadyError,
    RerankUnavailableError,
    UnknownCollectionError,
)
from service.schemas import (
    OrderDebug,
    RankDebug,
    RankRequest,
    RankResponse,
    RankResult,
    Timings,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankPlan:
    request: RankRequest
    collection: str
    retrieve_k: int
    rerank_n: int  # 0 when not reranking
    orders: int
    fusion: Fusion
    fusion_weight: float


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class RankService:
    def __init__(self, components: Components) -> None:
        self.c = components
        self.settings = components.settings

    def resolve_collection(self, name: str | None) -> str:
        loaded = self.c.collections
        if not loaded:
            raise NotReadyError(
                f"no collection is loaded from {self.settings.index_dir}; build one with "
                "`rankd index build` and restart"
            )
        if name is None:
            if len(loaded) == 1:
                return next(iter(loaded))
            raise CollectionRequiredError(
                f"{len(loaded)} collections are loaded ({', '.join(sorted(loaded))}); say which",
                "collection",
            )
        if name not in loaded:
            raise UnknownCollectionError(
                f"unknown collection {name!r}; loaded: {', '.join(sorted(loaded))}", "collection"
            )
        return name

    def check_query(self, query: str, field: str = "query") -> None:
        if len(query) > self.settings.max_query_chars:
            raise LimitExceededError(
                f"{field} is {len(query)} characters, over the limit of "
                f"{self.settings.max_query_chars} (RANKD_MAX_QUERY_CHARS)", field)

    def plan(self, request: RankRequest, prefix: str = "") -> RankPlan:
        s = self.settings
        self.check_query(request.query, f"{prefix}query")
        if request.top_k > s.max_top_k:
            raise LimitExceededError(
                f"top_k is {request.top_k}, over the limit of {s.max_top_k} (RANKD_MAX_TOP_K)",
                f"{prefix}top_k")
        candidates = request.candidates or s.default_candidates
        if candidates > s.max_candidates:
            raise LimitExceededError(
                f"candidates is {candidates}, over the limit of {s.max_candidates} "
                "(RANKD_MAX_CANDIDATES)", f"{prefix}candidates")
        collection = self.resolve_collection(request.collection)
        rerank_n = 0
        if request.rerank and self.c.scorer is not None:
            if candidates > self.c.scorer.max_items:
                raise LimitExceededError(
                    f"candidates is {candidates}, but the reranker has only "
                    f"{self.c.scorer.max_items} labels (RANKD_LABEL_ALPHABET)",
                    f"{prefix}candidates")
            rerank_n = candidates
        orders = request.orders or s.rerank_orders
        self.check_orders(orders, f"{prefix}orders")
        retrieve_k = max(request.top_k, rerank_n)
        return RankPlan(request, collection, retrieve_k, rerank_n, orders,
                        request.fusion or s.rerank_fusion,
                        s.rerank_fusion_weight if request.fusion_weight is None
                        else request.fusion_weight)

    def check_orders(self, orders: int, field: str = "orders") -> None:
        if orders > MAX_ORDERS:
            raise LimitExceededError(
                f"{field} is {orders}, over the limit of {MAX_ORDERS} (one rotation per "
                "candidate at most)", field)

    def _task(self, plan: RankPlan, hits: list[Hit]) -> ListwiseTask:
        manifest = self.c.collections[plan.collection].manifest
        top = hits[: plan.rerank_n]
        return ListwiseTask(
            template=self.settings.rerank_prompt_template,
            fields={"instruction": manifest.instruction or self.settings.rerank_instruction,
                    "query": plan.request.query},
            items=[h.text for h in top],
            item_ids=[h.id for h in top],
            orders=plan.orders,
        )

    async def rank(self, request: RankRequest) -> RankResponse:
        return (await self.rank_many([request]))[0]

    async def rank_many(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        started = time.perf_counter()
        plans = [self.plan(r, f"queries[{i}]." if len(requests) > 1 else "")
                 for i, r in enumerate(requests)]
        hits = await self.c.search_batcher.submit_many(
            [SearchQuery(p.request.query, p.collection, p.retrieve_k) for p in plans]
        )
        retrieved = time.perf_counter()
        self.c.metrics.stage_latency.labels("retrieve").observe(retrieved - started)

        to_rerank = [i for i, p in enumerate(plans) if p.rerank_n and hits[i]]
        scores: dict[int, ListwiseScores] = {}
        warnings: list[str] = []
        rerank_seconds: float | None = None
        if to_rerank:
            assert self.c.scorer is not None
            try:
                tasks = [self._task(plans[i], hits[i]) for i in to_rerank]
                scores = dict(zip(to_rerank, await self.c.scorer.score(tasks), strict=True))
            except BackendError as exc:
                self.c.metrics.rerank_failures.labels(exc.reason).inc()
                log.warning("rerank failed (%s): %s", exc.reason, exc)
                if self.settings.rerank_required:
                    raise RerankUnavailableError(
                        f"the reranker failed ({exc.reason}): {exc}; RANKD_RERANK_REQUIRED=true "
                        "turns this into an error instead of the retrieval order") from exc
                warnings.append(f"reranker unavailable ({exc.reason}): {exc}; results are in "
                                "retrieval order")
            rerank_seconds = time.perf_counter() - retrieved
            self.c.metrics.stage_latency.labels("rerank").observe(rerank_seconds)
        elif any(p.request.rerank for p in plans) and self.c.scorer is None:
            warnings.append("rerank was requested but no reranker is configured "
                            "(RANKD_RERANKER_BACKEND=none); results are in retrieval order")
        total = time.perf_counter() - started
        return [
            self._response(plan, hits[i], scores.get(i), warnings if plan.request.rerank else [],
                           Timings(retrieve=_ms(retrieved - started),
                                   rerank=None if rerank_seconds is None else _ms(rerank_seconds),
                                   total=_ms(total)))
            for i, plan in enumerate(plans)
        ]

    def _response(self, plan: RankPlan, hits: list[Hit], scored: ListwiseScores | None,
                  warnings: list[str], timings: Timings) -> RankResponse:
        k = plan.request.top_k
        results: list[RankResult]
        if scored is None:
            results = [RankResult(id=h.id, text=h.text, score=h.score, retrieval_score=h.score,
                                  rank=rank, rerank_score=None, order_spread=None)
                       for rank, h in enumerate(hits[:k], 1)]
        else:
            head = hits[: plan.rerank_n]
            final = fuse([h.score for h in head], scored.probabilities, plan.fusion,
                         plan.fusion_weight)
            # Stable sort: equal scores keep retrieval order.
            order = sorted(range(len(head)), key=lambda i: -final[i])
            ranked = [RankResult(id=head[i].id, text=head[i].text, score=final[i],
                                 retrieval_score=head[i].score, rank=0,
                                 rerank_score=scored.probabilities[i],
                                 order_spread=scored.spreads[i]) for i in order]
            ranked += [RankResult(id=h.id, text=h.text, score=0.0, retrieval_score=h.score,
                                  rank=0, rerank_score=None, order_spread=None)
                       for h in hits[plan.rerank_n:]]
            results = [r.model_copy(update={"rank": rank}) for rank, r in enumerate(ranked[:k], 1)]
        debug = None
        if plan.request.debug and scored is not None:
            debug = RankDebug(fusion=plan.fusion.value, fusion_weight=plan.fusion_weight, orders=[
                OrderDebug(positions=o.positions, prompt=o.prompt, labels=o.labels,
                           label_token_ids=o.label_token_ids, candidate_ids=o.item_ids,
                           probabilities=o.probabilities)
                for o in scored.orders
            ])
        return RankResponse(collection=plan.collection, results=results,
                            reranked=scored is not None, timings_ms=timings,
                            warnings=list(warnings), debug=debug)
