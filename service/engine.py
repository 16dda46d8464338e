"""The engine: everything rankd does, behind one object with no HTTP.

``Engine.start(settings)`` loads the embedder, the collections and the reranker; then
``rank``, ``rerank`` and ``answer`` each take a typed request (service/protocol.py) and return a
typed response, and ``ready`` and ``collections`` report on what is loaded. The HTTP routes
(service/routes.py) are thin adapters over these methods, and the clients, the benchmarks and the
tests can use the same object in process::

    engine = await Engine.start(load_settings())
    try:
        response = await engine.rank(RankRequest(query="..."))
    finally:
        await engine.close()

The path of a /rank request: ``plan`` checks it against the limits; the search micro-batcher
embeds the query with others that arrived with it and searches the collection; the scorer renders
the candidates in each order on its tokenizer thread, reads the label logprobs from the backend
(whose own micro-batcher shares forward passes between requests) and averages the orders;
``fuse`` combines that with the retrieval order. CPU work never runs on the event loop.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from reranker import BackendError, ListwiseScorer, ListwiseScores, ListwiseTask
from reranker.answer import fit_passages, format_context
from reranker.backends import LabelLogprobBackend
from reranker.config import LongItems
from reranker.errors import OverBudgetError
from reranker.fusion import Fusion
from reranker.ranking import fused_order, rank_task
from reranker.trained import TrainedSettings, with_trained_settings
from reranker.windows import balanced_windows, merge_window_scores
from retriever.search import SearchQuery
from retriever.vocabulary import Hit, Manifest
from runtime.batching import BatchObserver, JobTooLargeError
from service.errors import (
    CollectionRequiredError,
    LimitExceededError,
    NotReadyError,
    RerankUnavailableError,
    UnknownCollectionError,
)
from service.metrics import Metrics
from service.protocol import (
    AnswerRequest,
    AnswerResponse,
    AnswerTimings,
    CollectionInfo,
    ComponentStatus,
    FusionReport,
    OptionScore,
    OrderDebug,
    Passage,
    RankDebug,
    RankRequest,
    RankResponse,
    RankResult,
    ReadyResponse,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    Timings,
)
from service.retrieval import LocalRetrieval, RetrievalStage
from service.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankPlan:
    request: RankRequest
    collection: str
    retrieve_k: int
    rerank_n: int  # 0 when not reranking
    orders: int | None
    fusion: Fusion
    fusion_weight: float
    prefix: str = ""  # the path of the request in the body: "" or "queries[i]."


def public_name(name: str) -> str:
    """A model named by a filesystem path, as /ready shows it: its last component, since /ready
    answers without the API key and server paths are nobody's business."""
    if "/" in name and Path(name).expanduser().exists():
        return Path(name).name
    return name


# An absolute filesystem path inside a message: a slash-led run of path characters.
_PATH = re.compile(r"(?<![\w.:/])/[\w.~+-]+(?:/[\w.~+-]+)*/?")


def public_detail(message: str) -> str:
    """A message as /ready shows it: every absolute path replaced by its last component (the
    whole message stays in the log)."""
    return _PATH.sub(lambda m: Path(m.group(0)).name or "/", message)


def _truncation_warning(truncated: dict[int, tuple[int, int]], per_doc: int) -> str:
    """One line for the documents cut to fit, the first few named."""
    shown = ", ".join(f"documents[{i}] {t:,} -> {k:,}"
                      for i, (t, k) in sorted(truncated.items())[:5])
    more = f" and {len(truncated) - 5} more" if len(truncated) > 5 else ""
    return (f"{len(truncated)} document(s) were cut to fit the model's context "
            f"(max_tokens_per_doc {per_doc}, then a fair share of each prompt), in tokens: "
            f"{shown}{more}; meta.truncated_documents lists them all")


# /v1/rerank cuts a document longer than RANKD_MAX_DOCUMENT_CHARS to this many characters per
# token of its token cut before it is tokenized, so that the tokenizer's work is bounded
# whatever the length: no tokenizer's tokens average more characters than this over a page.
CHARS_PER_TOKEN = 16
# A request cut to fit the reranker's budget is aimed this far under it, and cut at most this
# often (each cut is predicted again before anything runs).
BUDGET_MARGIN = 0.8
BUDGET_CUTS = 3
MIN_TOKENS_PER_DOC = 16


def _budget_warning(per_doc: int, estimate_s: float, budget_s: float) -> str:
    return (f"the documents were cut further, to at most {per_doc} tokens each, to fit the "
            f"reranker's budget of {budget_s:g} s (uncut, about {estimate_s:.1f} s); set "
            "max_tokens_per_doc to choose the cut yourself (a request still over the budget "
            "is then refused with 422)")


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


class Engine:
    def __init__(self, settings: Settings, metrics: Metrics, retrieval: RetrievalStage,
                 scorer: ListwiseScorer | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.retrieval = retrieval
        self.scorer = scorer
        self.trained = TrainedSettings()  # what the reranker model's directory set

    @property
    def collections_loaded(self) -> dict[str, Manifest]:
        return self.retrieval.manifests

    # ------------------------------------------------------------------ life cycle

    @classmethod
    async def start(cls, settings: Settings, metrics: Metrics | None = None,
                    retrieval: RetrievalStage | None = None,
                    reranker_backend: LabelLogprobBackend | None = None) -> Engine:
        """Load and start everything; a configuration the engine cannot serve raises before
        anything is left running. ``retrieval`` and ``reranker_backend`` are stages started
        elsewhere (the Ray Serve application's deployments, service/ray_app.py); by default
        the engine loads its own."""
        metrics = metrics or Metrics()
        observer: BatchObserver = metrics
        # A trained model's directory says how it is served (reranker/trained.py); a setting
        # that would change its prompts refuses the start before anything loads.
        explicit_n = (settings.default_candidates
                      if "default_candidates" in settings.model_fields_set else None)
        reranker, trained = await asyncio.to_thread(with_trained_settings, settings.reranker,
                                                    explicit_n)
        settings = settings.model_copy(update={
            "reranker": reranker,
            "default_candidates": trained.candidates or settings.default_candidates})
        if trained.describe():
            log.info("reranker %s", trained.describe())
        if retrieval is None:
            retrieval = await LocalRetrieval.start(settings, observer)
        scorer = None
        if not settings.reranker.enabled:
            log.warning("no reranker configured (RANKD_RERANKER_BACKEND=none): serving retrieval "
                        "order only")
        else:
            try:
                scorer = await ListwiseScorer.create(settings.reranker, observer,
                                                     reranker_backend)
            except BaseException:
                await retrieval.close()  # start-up refused: leave no worker behind
                raise
        # Everything loaded so far lives as long as the engine. Freezing it keeps the collector
        # from walking the models' millions of objects in a full collection, which otherwise
        # lands on some request as a 0.3 s pause of the event loop (docs/experiments.md).
        gc.collect()
        gc.freeze()
        engine = cls(settings, metrics, retrieval, scorer)
        engine.trained = trained
        return engine

    async def close(self) -> None:
        await self.retrieval.close()
        if self.scorer is not None:
            await self.scorer.close()
        gc.unfreeze()  # what start froze can be collected again once it is dropped

    # ------------------------------------------------------------------ checks

    def resolve_collection(self, name: str | None, field: str = "collection") -> str:
        loaded = self.collections_loaded
        if not loaded:
            raise NotReadyError(
                "no collection is loaded from RANKD_INDEX_DIR; build one with `rankd index "
                "build` and restart")
        if name is None:
            if len(loaded) == 1:
                return next(iter(loaded))
            raise CollectionRequiredError(
                f"{len(loaded)} collections are loaded ({', '.join(sorted(loaded))}); say which",
                field)
        if name not in loaded:
            raise UnknownCollectionError(
                f"unknown collection {name!r}; loaded: {', '.join(sorted(loaded))}", field)
        return name

    def _check_chars(self, text: str, field: str, limit: int, setting: str) -> None:
        if len(text) > limit:
            raise LimitExceededError(
                f"{field} is {len(text)} characters, over the limit of {limit} ({setting})",
                field)

    def _check_query(self, text: str, field: str) -> None:
        self._check_chars(text, field, self.settings.max_query_chars, "RANKD_MAX_QUERY_CHARS")

    def _check_documents(self, texts: Sequence[str], field: str) -> None:
        for i, text in enumerate(texts):
            self._check_chars(text, f"{field}[{i}]", self.settings.max_document_chars,
                              "RANKD_MAX_DOCUMENT_CHARS")

    def _require_scorer(self, endpoint: str) -> ListwiseScorer:
        if self.scorer is None:
            raise RerankUnavailableError(
                f"{endpoint} needs the LLM and no reranker is configured "
                "(RANKD_RERANKER_BACKEND=none); set RANKD_RERANKER_BACKEND and "
                "RANKD_RERANKER_MODEL")
        return self.scorer

    def _backend_failed(self, exc: BackendError) -> RerankUnavailableError:
        self.metrics.rerank_failures.labels(exc.reason).inc()
        return RerankUnavailableError(f"the reranker failed ({exc.reason}): {exc}")

    # ------------------------------------------------------------------ /rank

    def plan(self, request: RankRequest, prefix: str = "") -> RankPlan:
        s = self.settings
        self._check_query(request.query, f"{prefix}query")
        if request.top_k > s.max_top_k:
            raise LimitExceededError(
                f"top_k is {request.top_k}, over the limit of {s.max_top_k} (RANKD_MAX_TOP_K)",
                f"{prefix}top_k")
        collection = self.resolve_collection(request.collection, f"{prefix}collection")
        rerank_n = 0
        if request.rerank and self.scorer is not None:
            rerank_n = request.candidates or s.default_candidates
            self.scorer.check_count(rerank_n, f"{prefix}candidates")
        return RankPlan(request, collection, max(request.top_k, rerank_n), rerank_n,
                        request.orders, request.fusion or s.reranker.fusion,
                        s.reranker.fusion_weight if request.fusion_weight is None
                        else request.fusion_weight, prefix)

    def _rank_task(self, plan: RankPlan, hits: list[Hit]) -> ListwiseTask:
        manifest = self.collections_loaded[plan.collection]
        return rank_task(self.settings.reranker.rank_template,
                         manifest.instruction or self.settings.reranker.instruction,
                         plan.request.query, hits[: plan.rerank_n], plan.orders, plan.prefix)

    def _too_large(self, exc: JobTooLargeError, field: str) -> LimitExceededError:
        return LimitExceededError(
            f"{exc} (RANKD_RERANKER_MAX_QUEUE_DEPTH): no retry can succeed; send fewer "
            "queries, documents, candidates or orders", field)

    async def rank(self, request: RankRequest) -> RankResponse:
        """Retrieve candidates for one query and rerank them."""
        return (await self.rank_many([request]))[0]

    async def rank_many(self, requests: Sequence[RankRequest]) -> list[RankResponse]:
        """Several queries: one search micro-batch and one scorer call for all of them."""
        limit = self.settings.max_batch_queries
        if len(requests) > limit:
            raise LimitExceededError(
                f"queries holds {len(requests)} items, over the limit of {limit} "
                "(RANKD_MAX_BATCH_QUERIES)", "queries")
        started = time.perf_counter()
        plans = [self.plan(r, f"queries[{i}]." if len(requests) > 1 else "")
                 for i, r in enumerate(requests)]
        if self.scorer is not None:
            # A request the reranker could never take is refused before anything runs.
            try:
                self.scorer.backend.check_capacity(sum(
                    self.scorer.prompts_for(p.rerank_n, p.orders) for p in plans))
            except JobTooLargeError as exc:
                raise self._too_large(exc, "queries" if len(requests) > 1 else "candidates") \
                    from None
        hits = await self.retrieval.search(
            [SearchQuery(p.request.query, p.collection, p.retrieve_k) for p in plans])
        retrieved = time.perf_counter()
        self.metrics.stage_latency.labels("retrieve").observe(retrieved - started)

        to_rerank = [i for i, p in enumerate(plans) if p.rerank_n and hits[i]]
        scores: dict[int, ListwiseScores] = {}
        warnings: list[str] = []
        rerank_seconds: float | None = None
        if to_rerank:
            assert self.scorer is not None
            try:
                tasks = [self._rank_task(plans[i], hits[i]) for i in to_rerank]
                scores = dict(zip(to_rerank, await self.scorer.rank(tasks), strict=True))
            except JobTooLargeError as exc:
                raise self._too_large(exc, "queries" if len(requests) > 1 else "candidates") \
                    from None
            except BackendError as exc:
                log.warning("rerank failed (%s): %s", exc.reason, exc)
                failure = self._backend_failed(exc)
                if self.settings.rerank_required:
                    raise RerankUnavailableError(
                        f"{failure}; RANKD_RERANK_REQUIRED=true turns this into an error instead "
                        "of the retrieval order") from exc
                warnings.append(f"reranker unavailable ({exc.reason}): {exc}; results are in "
                                "retrieval order")
            rerank_seconds = time.perf_counter() - retrieved
            self.metrics.stage_latency.labels("rerank").observe(rerank_seconds)
        elif any(p.request.rerank for p in plans) and self.scorer is None:
            warnings.append("rerank was requested but no reranker is configured "
                            "(RANKD_RERANKER_BACKEND=none); results are in retrieval order")
        total = time.perf_counter() - started
        timings = Timings(retrieve=_ms(retrieved - started),
                          rerank=None if rerank_seconds is None else _ms(rerank_seconds),
                          total=_ms(total))
        return [self._rank_response(plan, hits[i], scores.get(i),
                                    warnings if plan.request.rerank else [], timings)
                for i, plan in enumerate(plans)]

    def _rank_response(self, plan: RankPlan, hits: list[Hit], scored: ListwiseScores | None,
                       warnings: list[str], timings: Timings) -> RankResponse:
        k = plan.request.top_k
        results: list[RankResult]
        report: FusionReport | None = None
        if scored is None:
            results = [RankResult(id=h.id, text=h.text, score=h.score, retrieval_score=h.score,
                                  rank=rank, metadata=h.metadata, aliases=list(h.aliases))
                       for rank, h in enumerate(hits[:k], 1)]
        else:
            head = hits[: plan.rerank_n]
            fused = fused_order(head, scored, plan.fusion, plan.fusion_weight)
            order, final = fused.order, fused.scores
            report = FusionReport(method=plan.fusion.value, rerank_weight=fused.rerank_weight,
                                  agreement=fused.agreement, moved=fused.moved)
            self.metrics.rerank_moved.labels(str(fused.moved > 0).lower()).inc()
            self.metrics.rerank_weight.observe(fused.rerank_weight)
            if fused.agreement is not None:
                self.metrics.rerank_agreement.observe(fused.agreement)
            ranked = [RankResult(id=head[i].id, text=head[i].text, score=final[i],
                                 retrieval_score=head[i].score, rank=0,
                                 rerank_score=scored.probabilities[i],
                                 order_spread=scored.spreads[i], metadata=head[i].metadata,
                                 aliases=list(head[i].aliases))
                      for i in order]
            ranked += [RankResult(id=h.id, text=h.text, score=0.0, retrieval_score=h.score,
                                  rank=0, metadata=h.metadata, aliases=list(h.aliases))
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
                            reranked=scored is not None, timings_ms=timings, fusion=report,
                            warnings=list(warnings), debug=debug)

    # ------------------------------------------------------------------ /v1/rerank

    async def rerank(self, request: RerankRequest) -> RerankResponse:
        """Rerank the caller's documents for the query, best first; nothing is retrieved.

        More documents than labels are scored in balanced windows, all in one scorer call."""
        scorer = self._require_scorer("/v1/rerank")
        started = time.perf_counter()
        self._check_query(request.query, "query")
        limit = self.settings.max_rerank_documents
        if len(request.documents) > limit:
            raise LimitExceededError(
                f"documents holds {len(request.documents)} items, over the limit of {limit} "
                "(RANKD_MAX_RERANK_DOCUMENTS)", "documents")
        texts = request.texts()
        config = self.settings.reranker
        # Cohere cuts long documents rather than refusing them; an operator who wants refusals
        # sets RANKD_RERANKER_LONG_ITEMS=refuse, and then RANKD_MAX_DOCUMENT_CHARS holds too.
        truncate = config.long_items is LongItems.TRUNCATE
        if not truncate:
            self._check_documents(texts, "documents")
        windows = balanced_windows(len(texts), scorer.max_items)
        per_doc = request.max_tokens_per_doc
        # What the model can read of one document: a fair share of a listwise prompt, or a
        # pointwise prompt of its own; a cut to fit the budget scales down from there.
        readable = scorer.limits.max_prompt_tokens // (
            1 if scorer.pointwise is not None else max(len(w) for w in windows))
        over_budget: OverBudgetError | None = None
        for cuts in range(BUDGET_CUTS + 1):
            # Documents up to RANKD_MAX_DOCUMENT_CHARS (all that was accepted before) are
            # tokenized whole, so their reported tokens are exact; longer ones are cut first.
            chars = max(self.settings.max_document_chars,
                        CHARS_PER_TOKEN * min(per_doc, scorer.limits.max_prompt_tokens))
            cut_chars = [i for i, text in enumerate(texts) if truncate and len(text) > chars]
            shown = [text[:chars] if truncate else text for text in texts]
            tasks = [replace(ListwiseTask.for_query(
                         config.rank_template, config.instruction, request.query,
                         [shown[i] for i in window], [str(i) for i in window], request.orders,
                         [f"documents[{i}]" for i in window]), prompt_field="documents",
                         fit_items_within=per_doc if truncate else None)
                     for window in windows]
            try:
                scored = await scorer.rank(tasks)
                break
            except JobTooLargeError as exc:
                raise self._too_large(exc, "documents") from None
            except BackendError as exc:
                raise self._backend_failed(exc) from exc
            except OverBudgetError as exc:
                # Cut further only where the client left the cut to us (Cohere's default);
                # a cut the client chose is refused at once, naming the estimate and budget.
                if ("max_tokens_per_doc" in request.model_fields_set or not truncate
                        or cuts == BUDGET_CUTS or per_doc <= MIN_TOKENS_PER_DOC):
                    raise
                over_budget = over_budget or exc
                per_doc = max(MIN_TOKENS_PER_DOC, int(min(per_doc, readable) * BUDGET_MARGIN
                                                      * exc.budget_s / exc.estimate_s))
        # Listwise probabilities are shares of a window and are merged by their lift over
        # chance; a pointwise P(yes) means the same in every window.
        scores = (merge_window_scores(windows, [s.probabilities for s in scored])
                  if scorer.pointwise is None else [p for s in scored for p in s.probabilities])
        order = sorted(range(len(texts)), key=lambda i: -scores[i])
        if request.top_n is not None:
            order = order[: request.top_n]
        truncated = {window[i]: cut for window, s in zip(windows, scored, strict=True)
                     for i, cut in s.truncated.items()}
        meta: dict[str, object] = {"api_version": {"version": "2"},
                                   "billed_units": {"search_units": 1}}
        warnings = []
        if over_budget is not None:
            warnings.append(_budget_warning(per_doc, over_budget.estimate_s,
                                            over_budget.budget_s))
        if truncated:
            self.metrics.truncated_documents.inc(len(truncated))
            warnings.append(_truncation_warning(truncated, per_doc))
            # A document cut in characters first counts the tokens of what was kept of it.
            meta["truncated_documents"] = [
                {"index": i, "tokens": t, "kept_tokens": k,
                 **({"characters": len(texts[i])} if i in cut_chars else {})}
                for i, (t, k) in sorted(truncated.items())]
        if warnings:
            meta["warnings"] = warnings
        self.metrics.stage_latency.labels("rerank").observe(time.perf_counter() - started)
        return RerankResponse(
            id=str(uuid.uuid4()),
            model=config.model or "",
            results=[RerankResult(index=i, relevance_score=scores[i],
                                  document=(RerankDocument(text=texts[i])
                                            if request.return_documents else None))
                     for i in order],
            meta=meta,
            usage={"search_units": 1, "documents": len(texts), "windows": len(windows),
                   "truncated_documents": len(truncated)},
        )

    # ------------------------------------------------------------------ /answer

    async def answer(self, request: AnswerRequest) -> AnswerResponse:
        """Pick the answer: option probabilities averaged over the option orders."""
        scorer = self._require_scorer("/answer")
        started = time.perf_counter()
        self._check_query(request.question, "question")
        scorer.check_count(len(request.options), "options")
        self._check_documents(request.options, "options")
        if request.passages > self.settings.max_answer_passages:
            raise LimitExceededError(
                f"passages is {request.passages}, over the limit of "
                f"{self.settings.max_answer_passages} (RANKD_MAX_ANSWER_PASSAGES)", "passages")
        warnings: list[str] = []
        passages: list[Passage]
        if request.context is not None:
            self._check_documents(request.context, "context")
            passages = [Passage(id=f"context:{i}", text=t, score=None)
                        for i, t in enumerate(request.context)]
            if request.collection is not None:
                warnings.append("collection is ignored: the request gives its own context")
        elif request.passages:
            collection = self.resolve_collection(request.collection)
            query = request.question
            if self.settings.answer_query_with_options:
                query += "\n" + "\n".join(request.options)
            (hits,) = await self.retrieval.search(
                [SearchQuery(query, collection, request.passages)])
            passages = [Passage(id=h.id, text=h.text, score=h.score, metadata=h.metadata)
                        for h in hits]
        else:
            passages = []
        retrieved = time.perf_counter()
        used = await scorer.off_loop(fit_passages, scorer.renderer, [p.text for p in passages],
                                     self.settings.answer_context_tokens)
        seen: dict[str, int] = {}
        for i, option in enumerate(request.options):
            first = seen.setdefault(" ".join(option.split()).casefold(), i)
            if first != i:
                warnings.append(f"options[{first}] and options[{i}] are the same text: the "
                                "model sees them at different places and may give them "
                                "different probabilities")
        task = ListwiseTask(
            template=self.settings.reranker.answer_template,
            fields={"context": format_context([text for _, text in used][::-1]),
                    "question": request.question},
            items=request.options,
            item_ids=scorer.labels[: len(request.options)],
            orders=request.orders,
            prompt_field="options",
            item_fields=[f"options[{i}]" for i in range(len(request.options))],
        )
        try:
            (scored,) = await scorer.score([task])
        except JobTooLargeError as exc:
            raise self._too_large(exc, "orders") from None
        except BackendError as exc:
            raise self._backend_failed(exc) from exc
        answered = time.perf_counter()
        self.metrics.stage_latency.labels("answer").observe(answered - retrieved)
        options = sorted(
            (OptionScore(label=scorer.labels[i], index=i, text=text, probability=p)
             for i, (text, p) in enumerate(zip(request.options, scored.probabilities,
                                               strict=True))),
            key=lambda o: -o.probability)
        return AnswerResponse(
            options=options,
            ranking=[o.label for o in options],
            passages=[passages[i].model_copy(update={"text": text}) for i, text in used],
            timings_ms=AnswerTimings(retrieve=_ms(retrieved - started),
                                     answer=_ms(answered - retrieved),
                                     total=_ms(answered - started)),
            warnings=warnings,
        )

    # ------------------------------------------------------------------ operations

    async def ready(self) -> ReadyResponse:
        """Readiness with a status per component: embedder, each collection, reranker."""
        statuses: dict[str, ComponentStatus] = {
            "embedder": ComponentStatus(status="ok",
                                        detail=public_name(self.retrieval.embedder_name)),
        }
        problems = await self.retrieval.health()
        for name, manifest in self.collections_loaded.items():
            problem = problems.get(name)
            statuses[f"collection:{name}"] = ComponentStatus(
                status="error" if problem else "ok",
                detail=public_detail(problem) if problem
                else f"{manifest.count} entries, {manifest.backend}")
        for name, error in self.retrieval.errors.items():
            statuses[f"collection:{name}"] = ComponentStatus(status="error",
                                                             detail=public_detail(error))
        if self.scorer is None:
            statuses["reranker"] = ComponentStatus(
                status="disabled", detail="RANKD_RERANKER_BACKEND=none: retrieval order only")
        else:
            problem = await self.scorer.health()
            statuses["reranker"] = ComponentStatus(
                status="degraded" if problem else "ok",
                detail=public_detail(problem) if problem else "; ".join(filter(None, [
                    f"backend {self.scorer.backend_name}, model "
                    f"{public_name(self.scorer.model)}", self.scorer.backend.detail,
                    self.trained.describe()])))
        if not self.collections_loaded:
            statuses["collections"] = ComponentStatus(
                status="error", detail="no collection loaded from RANKD_INDEX_DIR (the start-up "
                                       "log names the directory)")
            overall = "not_ready"
        elif all(problems.get(name) for name in self.collections_loaded):
            overall = "not_ready"  # every store is down: nothing can be retrieved
        elif any(s.status in ("degraded", "error") for s in statuses.values()):
            overall = "degraded"
        else:
            overall = "ready"
        return ReadyResponse(status=overall, components=statuses)

    def collections(self) -> list[CollectionInfo]:
        """Loaded collections with their size, embedder and build time."""
        return [
            CollectionInfo(name=m.collection, count=m.count, embedder=m.embedder,
                           dimension=m.dimension, index_kind=m.index_kind, backend=m.backend,
                           built_at=m.created_at, instruction=m.instruction)
            for m in self.collections_loaded.values()
        ]
