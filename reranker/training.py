"""`rankd train-reranker`: fine-tune the LLM reranker on labelled queries.

The prompts are the serving prompts. Candidates come from the retriever the service will use
(``--retriever``: the zero-shot embedder, or a `rankd train-retriever` output); each example is
rendered by serving's renderer with the configured template, instruction, labels and scoring
mode, and the loss is over the label distribution that serving reads (``last_logits`` then
``label_log_softmax`` of ``TransformersBackend``, prefix sharing included):

- listwise: the cross-entropy of the positive's label among the N labels, for each order the
  example is shown in (by default the retrieval order and its reverse, the two orders served);
- pointwise: each candidate's own prompt gives the score log P(yes) - log P(no), and the loss is
  the cross-entropy of the positive among the query's N candidates (a listwise loss over
  pointwise scores, as cross-encoders are trained).

Evaluation scores through ``ListwiseScorer.rank`` over a ``TransformersBackend`` and ranks with
``fuse``: exactly the /rank path, so `rankd serve` with the written model and `rankd eval` on
``validation.csv`` reproduce the reported figures.

Training is full fine-tuning or LoRA through peft (merged into the weights at the end), run by
transformers' Trainer: its optimizer and schedule, gradient accumulation, progress bar,
checkpoints under ``output/checkpoints`` and bf16 on a GPU that supports it.

The stages are functions of their own: ``split_for_training``, ``retrieve_candidates``,
``build_examples``, ``fit``, ``save_model`` and ``RerankEvaluator``; ``train_reranker`` runs
them in order and writes the report.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.backends.base import LabelRead
from reranker.backends.transformers_backend import (
    LoadedModel,
    TransformersBackend,
    label_log_softmax,
)
from reranker.config import POINTWISE_LABELS, RerankerConfig, Scoring
from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion
from reranker.labels import POINTWISE_REMEDY, label_token_ids
from reranker.listwise import ListwiseScorer, ListwiseScores, ListwiseTask, PointwiseReading
from reranker.precision import DtypeChoice
from reranker.prompt import PromptRenderer
from reranker.ranking import fused_order, rank_task
from retriever.embedder import DEFAULT_EMBEDDER
from retriever.pairs import REPORT_FILE
from runtime.paths import select_device

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.pairs import Split, TrainingPair, ValidationSet
    from retriever.vocabulary import Hit

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# The rankd settings a trained model needs to be served as it was trained.
SERVING_FILE = "rankd_reranker.json"
# The written model's scores of the evaluated validation queries (bench/fusion_sweep.py).
SCORES_FILE = "validation_scores.jsonl"
# Fusions reported: the reranker's own order, and the service's default.
REPORTED_FUSIONS = (Fusion.NONE, DEFAULT_FUSION)


class RerankerTrainingError(ValueError):
    """The data or options cannot be used as given."""


class MissingPositive(StrEnum):
    INSERT = "insert"  # the positive takes the last candidate's place
    SKIP = "skip"  # the example is left out


class TuningMethod(StrEnum):
    LORA = "lora"
    FULL = "full"


class ExampleOrders(StrEnum):
    """Listwise: the orders each example is shown in (the candidate order, then reversed)."""

    BOTH = "both"  # both, as served: twice the prompts
    FORWARD = "forward"  # the candidate order only
    ALTERNATE = "alternate"  # one of the two per example, taking turns: half the prompts


class CandidateOrder(StrEnum):
    RETRIEVAL = "retrieval"  # as the retriever ranked them, as serving shows them
    SHUFFLED = "shuffled"  # a seeded random order per example


@dataclass(frozen=True)
class RerankerTrainingConfig:
    """Options of one run; the scoring mode is the served one, ``reranker.scoring``. The
    defaults are the recipe measured in docs/fine-tuning.md, which finishes on Eedi's
    train.csv on 2 CPU cores within 90 minutes, evaluation included."""

    output_dir: Path
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    retriever: str = DEFAULT_EMBEDDER
    device: str = "auto"
    candidates: int = 10  # N; with min_candidates, the largest N
    min_candidates: int = 0  # >= 2: each example draws its N from [min_candidates, candidates]
    examples: int = 1600  # training pairs used (seeded draw); 0: all of them
    candidate_order: CandidateOrder = CandidateOrder.RETRIEVAL
    example_orders: ExampleOrders = ExampleOrders.ALTERNATE
    missing_positive: MissingPositive = MissingPositive.SKIP
    max_tokens: int = 1024  # longer prompts are left out, and counted
    epochs: float = 1.0
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.05
    batch_size: int = 1  # examples per forward pass
    gradient_accumulation: int = 8
    method: TuningMethod = TuningMethod.FULL
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_layers: int = 0  # LoRA on the last N decoder layers only; 0: all of them
    # Full fine-tuning of the last N decoder layers and the final norm only (0: every weight).
    # The layers below run forward alone: no gradients flow through them.
    train_layers: int = 8
    validation_fraction: float = 0.2
    eval_queries: int = 300  # validation queries evaluated (whole questions, seeded); 0: all
    curve_points: int = 3  # evaluations during training, for the learning curve
    curve_queries: int = 100  # queries of the evaluations during training; 0: eval_queries'
    # Evaluate the model before training (the learning curve's first point). Runs that compare
    # options of one model and scoring mode can take it from one of them.
    base_eval: bool = False
    k: int = 25
    fusion_weight: float = DEFAULT_FUSION_WEIGHT  # the service's default
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 keeps torch's choice
    save_total_limit: int = 1
    progress: bool = True
    overwrite: bool = False

    @property
    def scoring(self) -> Scoring:
        return self.reranker.scoring

    def check(self) -> None:
        from retriever.pairs import require_positive

        positive = {"candidates": self.candidates, "epochs": self.epochs,
                    "learning rate": self.learning_rate, "batch size": self.batch_size,
                    "gradient accumulation": self.gradient_accumulation,
                    "LoRA rank": self.lora_rank, "k": self.k, "max tokens": self.max_tokens}
        require_positive(positive, RerankerTrainingError)
        if self.candidates < 2:
            raise RerankerTrainingError("candidates must be at least 2: the loss picks one of N")
        if self.min_candidates and not 2 <= self.min_candidates <= self.candidates:
            raise RerankerTrainingError(
                f"min candidates must be 0 (a fixed N) or between 2 and candidates "
                f"({self.candidates}), got {self.min_candidates}")
        labels = len(self.reranker.label_alphabet.labels())
        if self.candidates > labels:
            raise RerankerTrainingError(
                f"candidates ({self.candidates}) exceeds the {labels} labels of "
                f"RANKD_RERANKER_LABEL_ALPHABET={self.reranker.label_alphabet}")
        for name, value in {"curve points": self.curve_points, "LoRA layers": self.lora_layers,
                            "train layers": self.train_layers,
                            "examples": self.examples, "eval queries": self.eval_queries,
                            "curve queries": self.curve_queries}.items():
            if value < 0:
                raise RerankerTrainingError(f"{name} must not be negative, got {value}")


# ---------------------------------------------------------------- prompts


class PromptBuilder:
    """Serving's renderer and labels for training: the configured template, instruction, chat
    template, label alphabet and scoring mode, labels validated where the model answers, as at
    start-up."""

    def __init__(self, tokenizer: Any, config: RerankerConfig, instruction: str) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.instruction = instruction
        self.renderer = PromptRenderer(tokenizer, config.chat_template)
        self.labels = config.label_alphabet.labels()
        self.label_token_ids = label_token_ids(
            tokenizer, self.labels, self.renderer.answer_context(config.rank_template))
        self.pointwise: PointwiseReading | None = None
        if config.scoring is Scoring.POINTWISE:
            yes_no = list(POINTWISE_LABELS)
            self.pointwise = PointwiseReading(config.pointwise_template, yes_no, label_token_ids(
                tokenizer, yes_no, self.renderer.item_answer_context(config.pointwise_template),
                remedy=POINTWISE_REMEDY))

    def task(self, query: str, hits: Sequence[Hit]) -> ListwiseTask:
        return rank_task(self.config.rank_template, self.instruction, query, hits)

    def scorer(self, backend: TransformersBackend) -> ListwiseScorer:
        return ListwiseScorer(self.renderer, backend, self.labels, self.label_token_ids,
                              default_orders=self.config.orders, pointwise=self.pointwise)

    def listwise_read(self, task: ListwiseTask, positions: Sequence[int]) -> LabelRead:
        prompt = self.renderer.render(task.template, task.fields,
                                      [task.items[p] for p in positions],
                                      self.labels[: len(positions)])
        return LabelRead(prompt.token_ids, self.label_token_ids[: len(positions)])

    def pointwise_reads(self, task: ListwiseTask) -> list[LabelRead]:
        assert self.pointwise is not None
        return [LabelRead(self.renderer.render_item(self.pointwise.template, task.fields,
                                                    item).token_ids, self.pointwise.token_ids)
                for item in task.items]


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One training query as the model reads it.

    Listwise: one read per order, ``targets`` the positive's label index in each. Pointwise:
    one read per candidate, ``targets`` the positive's read alone."""

    reads: list[LabelRead]
    targets: list[int]
    query_id: str
    positive_id: str

    @property
    def tokens(self) -> int:
        return sum(len(r.prompt_token_ids) for r in self.reads)


@dataclass
class ExampleStats:
    pairs: int = 0
    positive_retrieved: int = 0
    positive_inserted: int = 0
    skipped_missing_positive: int = 0
    skipped_too_long: int = 0
    examples: int = 0
    prompts: int = 0
    positive_ranks: list[int] = field(default_factory=list)  # 1-based, where retrieved
    prompt_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tokens = sorted(self.prompt_tokens) or [0]
        ranks = self.positive_ranks
        return {"pairs": self.pairs, "positive_in_top_n": self.positive_retrieved,
                "positive_in_top_n_share": round(self.positive_retrieved / max(self.pairs, 1), 4),
                "positive_at_rank_1_share": round(sum(r == 1 for r in ranks)
                                                  / max(self.pairs, 1), 4),
                "positive_inserted": self.positive_inserted,
                "skipped_missing_positive": self.skipped_missing_positive,
                "skipped_too_long": self.skipped_too_long, "examples": self.examples,
                "prompts": self.prompts, "prompt_tokens_median": tokens[len(tokens) // 2],
                "prompt_tokens_max": tokens[-1]}


def build_examples(pairs: Sequence[TrainingPair], hits: Sequence[Sequence[Hit]],
                   entries: dict[str, Hit], builder: PromptBuilder,
                   config: RerankerTrainingConfig) -> tuple[list[Example], ExampleStats]:
    """One example per pair from its top-N candidates (N fixed, or drawn per example), the
    positive put in the last place when the retriever missed it, in the configured order."""
    rng = random.Random(config.seed)
    stats = ExampleStats()
    examples: list[Example] = []
    for pair, row in zip(pairs, hits, strict=True):
        stats.pairs += 1
        n = (rng.randint(config.min_candidates, config.candidates) if config.min_candidates
             else config.candidates)
        top = list(row[:n])
        ids = [h.id for h in top]
        if pair.positive_id in ids:
            stats.positive_retrieved += 1
            stats.positive_ranks.append(ids.index(pair.positive_id) + 1)
        elif config.missing_positive is MissingPositive.SKIP:
            stats.skipped_missing_positive += 1
            continue
        else:
            stats.positive_inserted += 1
            top[-1] = entries[pair.positive_id]
        positions = list(range(len(top)))
        if config.candidate_order is CandidateOrder.SHUFFLED:
            rng.shuffle(positions)
        ordered = [top[p] for p in positions]
        task = builder.task(pair.query, ordered)
        positive = [h.id for h in ordered].index(pair.positive_id)
        if config.scoring is Scoring.POINTWISE:
            reads = builder.pointwise_reads(task)
            targets = [positive]
        else:
            forward = list(range(len(ordered)))
            orders = {ExampleOrders.BOTH: [forward, forward[::-1]],
                      ExampleOrders.FORWARD: [forward],
                      ExampleOrders.ALTERNATE: [forward[::-1] if stats.pairs % 2 else forward],
                      }[config.example_orders]
            reads = [builder.listwise_read(task, order) for order in orders]
            targets = [order.index(positive) for order in orders]
        if max(len(r.prompt_token_ids) for r in reads) > config.max_tokens:
            stats.skipped_too_long += 1
            continue
        stats.prompt_tokens += [len(r.prompt_token_ids) for r in reads]
        examples.append(Example(reads, targets, pair.query_id, pair.positive_id))
    stats.examples = len(examples)
    stats.prompts = sum(len(e.reads) for e in examples)
    return examples, stats


def example_loss(backend: TransformersBackend, examples: Sequence[Example],
                 scoring: Scoring) -> Any:
    """The mean loss of ``examples``, read through serving's forward pass (prefix sharing
    included), with gradients."""
    import torch

    reads = [r for e in examples for r in e.reads]
    logprobs = label_log_softmax(backend.last_logits(reads), reads)
    losses = []
    cursor = 0
    for example in examples:
        rows = logprobs[cursor: cursor + len(example.reads)]
        cursor += len(example.reads)
        if scoring is Scoring.POINTWISE:
            # log P(yes) - log P(no) per candidate; the positive among the query's candidates.
            scores = torch.stack([row[0] - row[1] for row in rows])
            losses.append(-torch.log_softmax(scores, dim=-1)[example.targets[0]])
        else:
            losses.append(-torch.stack([row[t] for row, t in
                                        zip(rows, example.targets, strict=True)]).mean())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalQuery:
    key: str
    text: str
    relevant: frozenset[str]
    hits: list[Hit]  # the top-k retrieval, best first
    seen: bool


def ranked_ids(query: EvalQuery, scored: ListwiseScores, n: int, fusion: Fusion,
               weight: float) -> list[str]:
    """A query's ranking as /rank returns it: the top N reranked and fused, the rest after."""
    head = query.hits[:n]
    order = fused_order(head, scored, fusion, weight).order
    return [head[i].id for i in order] + [h.id for h in query.hits[n:]]


def mean_average_precision(ranked: dict[str, list[str]], queries: Sequence[EvalQuery],
                           k: int) -> dict[str, float | int | None]:
    """MAP@k (and recall@k) of ``queries``, overall, seen and unseen."""
    from retriever.evaluation import summarize

    figures = summarize(ranked, {q.key: q.relevant for q in queries}, k,
                        {q.key for q in queries if q.seen})
    return {key: round(value, 4) if isinstance(value, float) else value
            for key, value in figures.items()}


class RerankEvaluator:
    """MAP@k of the reranked validation queries, as /rank orders them: the top-N scored in the
    served mode (listwise in the configured orders, or pointwise), fused (or not) with the
    retrieval order, the rest in retrieval order."""

    def __init__(self, queries: Sequence[EvalQuery], builder: PromptBuilder,
                 config: RerankerTrainingConfig) -> None:
        self.queries = list(queries)
        self.builder = builder
        self.config = config
        self.seconds: list[float] = []
        # The last call's ranking of each query, by fusion: figures on a subset need no rerun.
        self.ranked: dict[str, dict[str, list[str]]] = {}
        self.scores: list[ListwiseScores] = []  # the last call's, in query order

    def subset(self, limit: int) -> RerankEvaluator:
        """The first ``limit`` queries (already in a seeded order), for the learning curve."""
        return RerankEvaluator(self.queries[:limit] if limit else self.queries, self.builder,
                               self.config)

    def write_scores(self, path: Path, header: dict[str, Any]) -> None:
        """The last call's scores, one query a line after a header, in the form
        bench/rerank_quality.py --dump writes: bench/fusion_sweep.py judges every fusion on
        them without running the model again."""
        n = self.config.candidates
        with path.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"header": header}) + "\n")
            for query, scored in zip(self.queries, self.scores, strict=True):
                head = query.hits[:n]
                out.write(json.dumps({
                    "id": query.key, "relevant": sorted(query.relevant),
                    "head": [h.id for h in head], "retrieval_scores": [h.score for h in head],
                    "tail": [h.id for h in query.hits[n:]],
                    "orders": [{"positions": o.positions, "probabilities": o.probabilities}
                               for o in scored.orders]}) + "\n")

    def last_figures_on(self, queries: Sequence[EvalQuery]) -> dict[str, Any]:
        """The last call's figures on ``queries``, a subset of this evaluator's."""
        return {fusion: mean_average_precision(ranked, queries, self.config.k)
                for fusion, ranked in self.ranked.items()}

    def retrieval_only(self) -> dict[str, float | int | None]:
        ranked = {q.key: [h.id for h in q.hits] for q in self.queries}
        return mean_average_precision(ranked, self.queries, self.config.k)

    def ceiling(self) -> dict[str, float | int | None]:
        """What a perfect reranker of the top N would reach: the positive first wherever it is
        among the candidates, the rest unchanged."""
        n = self.config.candidates
        ranked = {}
        for q in self.queries:
            head = [h.id for h in q.hits[:n]]
            found = [i for i in head if i in q.relevant]
            ranked[q.key] = found + [i for i in head if i not in q.relevant] + \
                [h.id for h in q.hits[n:]]
        figures = mean_average_precision(ranked, self.queries, self.config.k)
        figures["positive_in_head_share"] = round(
            sum(any(h.id in q.relevant for h in q.hits[:n]) for q in self.queries)
            / max(len(self.queries), 1), 4)
        return figures

    def __call__(self, loaded: LoadedModel) -> dict[str, Any]:
        started = time.perf_counter()
        # All queries go to the backend in one call: its per-call timeout is for serving.
        reranker = self.config.reranker.model_copy(update={"backend": "transformers",
                                                           "timeout_s": 7 * 24 * 3600.0})
        scorer = self.builder.scorer(TransformersBackend(loaded, reranker))
        n = self.config.candidates
        tasks = [self.builder.task(q.text, q.hits[:n]) for q in self.queries]
        scores = asyncio.run(_rank_all(scorer, tasks))
        self.scores = scores
        figures: dict[str, Any] = {}
        for fusion in REPORTED_FUSIONS:
            self.ranked[fusion.value] = {
                q.key: ranked_ids(q, scored, n, fusion, self.config.fusion_weight)
                for q, scored in zip(self.queries, scores, strict=True)}
            figures[fusion.value] = mean_average_precision(self.ranked[fusion.value],
                                                           self.queries, self.config.k)
        agreements = [s.agreement for s in scores if s.agreement is not None]
        if agreements:
            figures["mean_agreement"] = round(sum(agreements) / len(agreements), 4)
        figures["dtype"] = loaded.dtype.name
        self.seconds.append(time.perf_counter() - started)
        return figures


async def _rank_all(scorer: ListwiseScorer, tasks: Sequence[ListwiseTask]) -> list[Any]:
    await scorer.backend.start()
    try:
        return await scorer.rank(tasks)
    finally:
        await scorer.close()


# ---------------------------------------------------------------- stages


@dataclass(frozen=True)
class TrainingData:
    split: Split
    train_pairs: list[TrainingPair]
    validation: ValidationSet
    eval_groups: set[str]
    eval_keys: list[str]  # validation query keys in a seeded order


def _eval_subset(split: Split, limit: int, seed: int) -> set[str]:
    """Whole validation questions, drawn in a seeded order until ``limit`` queries (0: all)."""
    by_group: dict[str, int] = {}
    for pair in split.validation:
        by_group[pair.group] = by_group.get(pair.group, 0) + 1
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)
    chosen: set[str] = set()
    total = 0
    for group in groups:
        if limit and total >= limit:
            break
        chosen.add(group)
        total += by_group[group]
    return chosen


def split_for_training(pairs: Sequence[TrainingPair],
                       config: RerankerTrainingConfig) -> TrainingData:
    """The retriever's split (the same function and seed, so a `rankd train-retriever` run
    with the same options trained on none of these validation questions), the training pairs
    drawn, and the validation questions evaluated."""
    from retriever.pairs import split_pairs, validation_set

    split = split_pairs(pairs, config.validation_fraction, seed=config.seed)
    eval_groups = _eval_subset(split, config.eval_queries, config.seed)
    validation = validation_set(replace(split, validation=[p for p in split.validation
                                                           if p.group in eval_groups]))
    train_pairs = list(split.train)
    random.Random(config.seed).shuffle(train_pairs)
    if config.examples:
        train_pairs = train_pairs[: config.examples]
    keys = sorted(validation.queries)
    random.Random(config.seed).shuffle(keys)
    return TrainingData(split, train_pairs, validation, eval_groups, keys)


def retrieve_candidates(entries: Sequence[CatalogEntry], data: TrainingData,
                        config: RerankerTrainingConfig, device: str,
                        ) -> tuple[list[list[Hit]], list[list[Hit]]]:
    """Each training pair's top N and each evaluated query's top k, retrieved by
    ``config.retriever`` as the service would retrieve them."""
    from retriever import Embedder, build_collection, load_collection

    embedder = Embedder.load(config.retriever, "cpu" if device == "cpu" else "auto")
    depth = max(config.k, config.candidates)
    with tempfile.TemporaryDirectory(prefix="rankd-rerank-train-") as tmp:
        catalogue = load_collection(build_collection(list(entries), embedder, tmp, "catalogue",
                                                     show_progress=config.progress))
        train_hits = catalogue.search(embedder.encode([p.query for p in data.train_pairs]),
                                      config.candidates)
        eval_hits = catalogue.search(
            embedder.encode([data.validation.queries[k] for k in data.eval_keys]), depth)
    return train_hits, eval_hits


def _lora(model: Any, config: RerankerTrainingConfig) -> Any:
    import torch
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    chosen = (list(range(max(0, layers - config.lora_layers), layers)) if config.lora_layers
              else None)
    # peft takes "all-linear" only for every layer; for some layers, the decoder's own Linear
    # names (q_proj, ..., down_proj), the output layer left out.
    output = model.get_output_embeddings()
    targets: str | list[str] = "all-linear" if chosen is None else sorted({
        name.rsplit(".", 1)[-1] for name, module in model.get_decoder().named_modules()
        if isinstance(module, torch.nn.Linear) and module is not output})
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=targets, layers_to_transform=chosen,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _freeze_below(model: Any, layers: int) -> None:
    """Train only the last ``layers`` decoder layers and the final norm; the embeddings (and an
    output layer tied to them) and every layer below stay as they are."""
    decoder = model.get_decoder()
    for parameter in model.parameters():
        parameter.requires_grad = False
    for module in [*list(decoder.layers)[-layers:], decoder.norm]:
        for parameter in module.parameters():
            parameter.requires_grad = True


def _trainable(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def _collate(batch: Sequence[Example]) -> dict[str, Any]:
    return {"examples": list(batch)}


@dataclass
class Fitted:
    model: Any  # the trained model (a peft model for LoRA)
    steps: int
    loss: list[dict[str, float]]
    curve: list[dict[str, Any]]
    train_seconds: float
    curve_seconds: float


def fit(model: Any, examples: list[Example], config: RerankerTrainingConfig, device: str,
        pad_token_id: int, output: Path,
        evaluate: Callable[[], dict[str, Any]]) -> Fitted:
    """Train with transformers' Trainer; ``evaluate`` runs at each learning-curve point."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    forward = TransformersBackend(
        LoadedModel(model, device, pad_token_id, DtypeChoice("float32", "training weights")),
        config.reranker)
    per_step = config.batch_size * config.gradient_accumulation
    total_steps = max(1, round(max(1, -(-len(examples) // per_step)) * config.epochs))
    curve_steps = sorted({max(1, round(total_steps * (i + 1) / (config.curve_points + 1)))
                          for i in range(config.curve_points)} - {total_steps})
    curve: list[dict[str, Any]] = []
    curve_seconds = 0.0

    class Curve(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            nonlocal curve_seconds
            if state.global_step in curve_steps:
                started = time.perf_counter()
                curve.append({"step": state.global_step,
                              "examples": min(state.global_step * per_step,
                                              round(len(examples) * config.epochs)),
                              **evaluate()})
                curve_seconds += time.perf_counter() - started
                log.info("step %d: MAP@%d %s", state.global_step, config.k,
                         curve[-1][Fusion.NONE.value]["map"])

    class RerankTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The loss is a mean over the batch; the Trainer averages over accumulation.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = example_loss(forward, inputs["examples"], config.scoring)
            return (loss, None) if return_outputs else loss

    on_gpu = device.startswith("cuda")
    args = TrainingArguments(
        output_dir=str(output / CHECKPOINT_DIR),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        lr_scheduler_type="linear",
        seed=config.seed,
        data_seed=config.seed,
        save_strategy="steps",
        save_steps=max(1, min(curve_steps or [total_steps])),
        save_total_limit=config.save_total_limit,
        save_only_model=True,
        logging_steps=max(1, total_steps // 20),
        disable_tqdm=not config.progress,
        report_to="none",
        use_cpu=not on_gpu,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        remove_unused_columns=False,
        dataloader_num_workers=0,
    )
    trainer = RerankTrainer(model=model, args=args, train_dataset=examples,
                            data_collator=_collate, callbacks=[Curve()])
    started = time.perf_counter()
    trainer.train()
    loss = [{"step": e["step"], "loss": round(e["loss"], 4)}
            for e in trainer.state.log_history if "loss" in e]
    return Fitted(model, trainer.state.global_step, loss, curve,
                  time.perf_counter() - started - curve_seconds, curve_seconds)


def save_model(fitted: Fitted, tokenizer: Any, config: RerankerTrainingConfig,
               output: Path) -> None:
    """The merged model, written as RANKD_RERANKER_MODEL, vLLM and `rankd quantize` load it,
    with the scoring settings it was trained for."""
    model = fitted.model
    merged = model.merge_and_unload() if config.method is TuningMethod.LORA else model
    merged.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    (output / SERVING_FILE).write_text(json.dumps(served_settings(config.reranker), indent=2)
                                       + "\n", encoding="utf-8")


def served_settings(config: RerankerConfig) -> dict[str, Any]:
    """What serving must match for the prompts to be the trained ones."""
    settings: dict[str, Any] = {"scoring": config.scoring.value,
                                "chat_template": config.chat_template}
    if config.scoring is Scoring.POINTWISE:
        settings["pointwise_template"] = config.pointwise_template
    else:
        settings.update(rank_template=config.rank_template,
                        label_alphabet=config.label_alphabet.value)
    return settings


def train_reranker(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
                   config: RerankerTrainingConfig, train_file: Path, train_format: str,
                   instruction: str | None = None) -> dict[str, Any]:
    """Train, save the merged model to ``config.output_dir``, evaluate and write the report."""
    config.check()
    import torch
    from transformers import AutoModelForCausalLM

    from reranker.models import resolve_model
    from reranker.prompt import load_tokenizer
    from retriever.pairs import check_positives, prepare_output, write_validation_file
    from retriever.training_components import peak_rss_mib
    from retriever.vocabulary import Hit

    check_positives(pairs, entries)
    output = Path(config.output_dir)
    prepare_output(output, config.overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    seconds: dict[str, Any] = {}
    device = select_device(config.device)
    torch.manual_seed(config.seed)

    data = split_for_training(pairs, config)
    validation_path = write_validation_file(train_file, train_format, data.eval_groups, output)

    stage = time.perf_counter()
    train_hits, eval_hits = retrieve_candidates(entries, data, config, device)
    # A positive the retriever missed joins the candidates as itself, with no retrieval score.
    by_id = {e.id: Hit(e.id, e.text, 0.0) for e in entries}
    seconds["retrieval"] = round(time.perf_counter() - stage, 1)

    location = resolve_model(config.reranker.model or "", config.reranker.cache_dir)
    tokenizer = load_tokenizer(location)
    builder = PromptBuilder(tokenizer, config.reranker,
                            instruction or config.reranker.instruction)
    stage = time.perf_counter()
    examples, stats = build_examples(data.train_pairs, train_hits, by_id, builder, config)
    seconds["examples"] = round(time.perf_counter() - stage, 1)
    if not examples:
        raise RerankerTrainingError("no training examples remain (every positive was missing "
                                    "or every prompt was over --max-tokens)")
    trained_ids = {e.positive_id for e in examples}
    validation = data.validation
    queries = [EvalQuery(k, validation.queries[k], frozenset(validation.relevant[k]), list(hits),
                         bool(validation.relevant[k] & trained_ids))
               for k, hits in zip(data.eval_keys, eval_hits, strict=True)]
    evaluator = RerankEvaluator(queries, builder, config)
    curve_evaluator = evaluator.subset(config.curve_queries)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = model.to(device)
    if config.method is TuningMethod.LORA:
        model = _lora(model, config)
    elif config.train_layers:
        _freeze_below(model, config.train_layers)
    trainable, total = _trainable(model)
    log.info("%d of %d parameters train (%s); %d examples, %d prompts", trainable, total,
             config.method, len(examples), stats.prompts)

    def evaluate_with(chosen: RerankEvaluator) -> Callable[[], dict[str, Any]]:
        def run() -> dict[str, Any]:
            model.eval()
            try:
                inner = model.get_base_model() if config.method is TuningMethod.LORA else model
                return chosen(LoadedModel(inner, device, int(pad),
                                          DtypeChoice("float32", "training weights")))
            finally:
                model.train()
        return run

    retrieval_only = evaluator.retrieval_only()
    ceiling = evaluator.ceiling()
    stage = time.perf_counter()
    base: dict[str, Any] | None = None
    base_on_curve: dict[str, Any] | None = None
    if config.base_eval:
        base = evaluate_with(evaluator)()  # LoRA starts at zero: the peft model is the base
        base_on_curve = (base if curve_evaluator.queries == evaluator.queries
                         else evaluate_with(curve_evaluator)())
    seconds["evaluate_base"] = round(time.perf_counter() - stage, 1)

    fitted = fit(model, examples, config, device, int(pad), output,
                 evaluate_with(curve_evaluator))
    seconds["train"] = round(fitted.train_seconds, 1)
    seconds["evaluate_curve"] = round(fitted.curve_seconds, 1)
    seconds["train_per_example"] = round(fitted.train_seconds / (len(examples) * config.epochs),
                                         3)

    stage = time.perf_counter()
    save_model(fitted, tokenizer, config, output)
    seconds["save"] = round(time.perf_counter() - stage, 1)

    # What was written, loaded the way `rankd serve` loads it (dtype auto included).
    stage = time.perf_counter()
    served = config.reranker.model_copy(update={"model": str(output), "backend": "transformers",
                                                "device": device})
    fine_tuned = evaluator(TransformersBackend.load(served, tokenizer))
    evaluator.write_scores(output / SCORES_FILE, {
        "command": "rankd train-reranker", "queries": len(evaluator.queries),
        "candidates": config.candidates, "reranker": f"{config.scoring} {output}",
        "embedder": config.retriever})
    seconds["evaluate_fine_tuned"] = round(time.perf_counter() - stage, 1)
    curve = ([{"step": 0, "examples": 0, **base_on_curve}] if base_on_curve else []) \
        + fitted.curve
    # The written model's point, on the curve's queries (scored once, above).
    curve.append({"step": fitted.steps, "examples": round(len(examples) * config.epochs),
                  **(fine_tuned if curve_evaluator.queries == evaluator.queries
                     else evaluator.last_figures_on(curve_evaluator.queries))})
    seconds["total"] = round(time.perf_counter() - started, 1)
    seconds["cpu_total"] = round(time.process_time() - cpu_started, 1)

    report: dict[str, Any] = {
        "status": "complete",
        "base_model": config.reranker.model,
        "output": str(output.resolve()),
        "validation_file": str(validation_path.resolve()),
        "device": device,
        "config": _plain(asdict(config)),
        "scoring": config.scoring.value,
        "instruction": builder.instruction,
        "retriever": {"model": config.retriever, **_retriever_report(config.retriever)},
        "parameters": {"trainable": trainable, "total": total},
        "split": {"pairs": len(pairs), "train_pairs": len(data.split.train),
                  "validation_pairs": len(data.split.validation),
                  "validation_questions": len({p.group for p in data.split.validation}),
                  "evaluated_questions": len(data.eval_groups),
                  "curve_queries": len(curve_evaluator.queries)},
        "examples": stats.summary(),
        "trained_groups": sorted({p.group for p in data.train_pairs}),
        "validation_groups": sorted({p.group for p in data.split.validation}),
        "retrieval_only": retrieval_only,
        "ceiling": ceiling,
        "base": base,
        "fine_tuned": fine_tuned,
        "learning_curve": curve,
        "train_loss": fitted.loss,
        "seconds": seconds,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if device.startswith("cuda"):
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _retriever_report(retriever: str) -> dict[str, Any]:
    """The retriever's own validation figures, when it is a `rankd train-retriever` output."""
    path = Path(retriever) / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return {key: report[key] for key in ("zero_shot", "fine_tuned", "validation_groups")
            if key in report}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
