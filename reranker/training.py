"""`rankd train-reranker`: fine-tune the listwise LLM reranker on labelled queries.

The prompts are the serving prompts: candidates come from the retriever as the service would
retrieve them, each example is a ``ListwiseTask.for_query`` rendered by ``render_order`` with the
configured template, instruction and labels, and the loss is the cross-entropy of the label
distribution that serving reads (``last_logits`` then ``label_log_softmax``: the next-token
logits at the answer position, restricted to the N labels and renormalised). Evaluation scores
through ``ListwiseScorer`` over a ``TransformersBackend``, in both orders, and ranks with
``fused_order``: exactly the /rank path, so `rankd serve` with the written model and `rankd eval`
on ``validation.csv`` reproduce the reported figures.

Training is LoRA through peft (merged into the weights at the end) or full fine-tuning, run by
transformers' Trainer: its optimizer and schedule, gradient accumulation, progress bar,
checkpoints under ``output/checkpoints`` and bf16 on a GPU that supports it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.backends.base import LabelRead
from reranker.backends.transformers_backend import (
    LoadedModel,
    TransformersBackend,
    label_log_softmax,
    last_logits,
)
from reranker.config import RerankerConfig
from reranker.fusion import DEFAULT_FUSION_WEIGHT, Fusion, fused_order
from reranker.labels import label_token_ids
from reranker.listwise import ListwiseScorer, ListwiseTask, render_order
from reranker.precision import DtypeChoice
from reranker.prompt import PromptRenderer

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.index import Hit
    from retriever.training import Split, TrainingPair

log = logging.getLogger(__name__)

REPORT_FILE = "training_report.json"
CHECKPOINT_DIR = "checkpoints"
# Fusions reported: the reranker's own order, and the service's default.
REPORTED_FUSIONS = (Fusion.NONE, Fusion.RRF)


class RerankerTrainingError(ValueError):
    """The data or options cannot be used as given."""


class MissingPositive(StrEnum):
    INSERT = "insert"  # the positive takes the last candidate's place
    SKIP = "skip"  # the example is left out


class TuningMethod(StrEnum):
    LORA = "lora"
    FULL = "full"


@dataclass(frozen=True)
class RerankerTrainingConfig:
    """Options of one run. The defaults finish on Eedi's train.csv on 2 CPU cores within the
    90 minutes measured in the README's fine-tuning section."""

    output_dir: Path
    reranker: RerankerConfig = field(default_factory=RerankerConfig)
    retriever: str = "sentence-transformers/all-MiniLM-L6-v2"
    device: str = "auto"
    candidates: int = 10
    examples: int = 1000  # training pairs drawn (seeded) from the training split
    both_orders: bool = False  # also train on each example's reversed order
    missing_positive: MissingPositive = MissingPositive.INSERT
    max_tokens: int = 1024  # longer prompts are left out, and counted
    epochs: float = 1.0
    learning_rate: float = 3e-4
    warmup_ratio: float = 0.05
    batch_size: int = 1
    gradient_accumulation: int = 8
    method: TuningMethod = TuningMethod.LORA
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_layers: int = 0  # LoRA on the last N decoder layers only; 0: all of them
    validation_fraction: float = 0.2
    eval_queries: int = 160  # validation queries evaluated (whole questions, seeded)
    curve_points: int = 2  # evaluations during training, for the learning curve
    k: int = 25
    fusion_weight: float = DEFAULT_FUSION_WEIGHT  # rrf's retrieval weight, as the service's
    seed: int = 42
    threads: int = 0  # torch intra-op threads; 0 keeps torch's choice
    save_total_limit: int = 2
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        positive = {"candidates": self.candidates, "examples": self.examples,
                    "epochs": self.epochs, "learning rate": self.learning_rate,
                    "batch size": self.batch_size,
                    "gradient accumulation": self.gradient_accumulation,
                    "LoRA rank": self.lora_rank, "eval queries": self.eval_queries,
                    "k": self.k, "max tokens": self.max_tokens}
        from retriever.training import require_positive

        require_positive(positive, RerankerTrainingError)
        if self.candidates < 2:
            raise RerankerTrainingError("candidates must be at least 2: the loss picks one of N")
        labels = len(self.reranker.label_alphabet.labels())
        if self.candidates > labels:
            raise RerankerTrainingError(
                f"candidates ({self.candidates}) exceeds the {labels} labels of "
                f"RANKD_RERANKER_LABEL_ALPHABET={self.reranker.label_alphabet}")
        if self.curve_points < 0 or self.lora_layers < 0:
            raise RerankerTrainingError("curve points and LoRA layers must not be negative")


# ---------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One training prompt: its tokens, the label tokens it offers, and the right label."""

    text: str  # the rendered prompt, chat template included
    prompt_token_ids: list[int]
    label_token_ids: list[int]
    target: int  # index into label_token_ids
    query_id: str
    positive_id: str


@dataclass
class ExampleStats:
    pairs: int = 0
    positive_retrieved: int = 0
    positive_inserted: int = 0
    skipped_missing_positive: int = 0
    skipped_too_long: int = 0
    prompts: int = 0
    prompt_tokens: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        tokens = sorted(self.prompt_tokens) or [0]
        return {"pairs": self.pairs, "positive_in_top_n": self.positive_retrieved,
                "positive_in_top_n_share": round(self.positive_retrieved / max(self.pairs, 1), 4),
                "positive_inserted": self.positive_inserted,
                "skipped_missing_positive": self.skipped_missing_positive,
                "skipped_too_long": self.skipped_too_long, "prompts": self.prompts,
                "prompt_tokens_median": tokens[len(tokens) // 2],
                "prompt_tokens_max": tokens[-1]}


class PromptBuilder:
    """Serving's renderer and labels for training: the configured template, instruction, chat
    template and label alphabet, labels validated where the model answers, as at start-up."""

    def __init__(self, tokenizer: Any, config: RerankerConfig, instruction: str) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.instruction = instruction
        self.renderer = PromptRenderer(tokenizer, config.chat_template)
        self.labels = config.label_alphabet.labels()
        self.label_token_ids = label_token_ids(
            tokenizer, self.labels, self.renderer.answer_context(config.rank_template))

    def task(self, query: str, hits: Sequence[Hit]) -> ListwiseTask:
        return ListwiseTask.for_query(self.config.rank_template, self.instruction, query,
                                      [h.text for h in hits], [h.id for h in hits])

    def example(self, pair: TrainingPair, hits: Sequence[Hit], positions: Sequence[int]) -> Example:
        """The prompt with the candidates in ``positions`` order; the positive is one of them."""
        ids = [h.id for h in hits]
        prompt = render_order(self.renderer, self.labels, self.task(pair.query, hits), positions)
        target = list(positions).index(ids.index(pair.positive_id))
        return Example(prompt.text, prompt.token_ids, self.label_token_ids[: len(hits)], target,
                       pair.query_id, pair.positive_id)


def build_examples(pairs: Sequence[TrainingPair], hits: Sequence[Sequence[Hit]],
                   entries: dict[str, Hit], builder: PromptBuilder,
                   config: RerankerTrainingConfig) -> tuple[list[Example], ExampleStats]:
    """Examples from the top-N candidates of each pair, in a seeded random order each (and
    reversed, with ``both_orders``), so the model cannot learn a position."""
    rng = random.Random(config.seed)
    stats = ExampleStats()
    examples: list[Example] = []
    n = config.candidates
    for pair, row in zip(pairs, hits, strict=True):
        stats.pairs += 1
        top = list(row[:n])
        if any(h.id == pair.positive_id for h in top):
            stats.positive_retrieved += 1
        elif config.missing_positive is MissingPositive.SKIP:
            stats.skipped_missing_positive += 1
            continue
        else:
            stats.positive_inserted += 1
            top[-1] = entries[pair.positive_id]
        positions = list(range(len(top)))
        rng.shuffle(positions)
        orders = [positions, positions[::-1]] if config.both_orders else [positions]
        for order in orders:
            example = builder.example(pair, top, order)
            if len(example.prompt_token_ids) > config.max_tokens:
                stats.skipped_too_long += 1
                break
            stats.prompt_tokens.append(len(example.prompt_token_ids))
            examples.append(example)
    stats.prompts = len(examples)
    return examples, stats


# ---------------------------------------------------------------- evaluation


@dataclass(frozen=True)
class EvalQuery:
    key: str
    text: str
    relevant: frozenset[str]
    hits: list[Hit]  # the top-k retrieval, best first
    seen: bool


def mean_average_precision(ranked: dict[str, list[str]], queries: Sequence[EvalQuery],
                           k: int) -> dict[str, float | int | None]:
    from clients.evaluate import average_precision

    def mean(subset: Sequence[EvalQuery]) -> float | None:
        if not subset:
            return None  # JSON has no NaN
        return round(sum(average_precision(ranked[q.key], sorted(q.relevant), k)
                         for q in subset) / len(subset), 4)

    seen = [q for q in queries if q.seen]
    unseen = [q for q in queries if not q.seen]
    return {"map": mean(queries), "map_seen": mean(seen), "map_unseen": mean(unseen),
            "queries": len(queries), "seen": len(seen), "unseen": len(unseen)}


class RerankEvaluator:
    """MAP@k of the reranked validation queries, as /rank orders them: the top-N reranked in
    the configured orders, fused (or not) with the retrieval order, the rest in retrieval order."""

    def __init__(self, queries: Sequence[EvalQuery], builder: PromptBuilder,
                 config: RerankerTrainingConfig) -> None:
        self.queries = list(queries)
        self.builder = builder
        self.config = config
        self.seconds: list[float] = []

    def retrieval_only(self) -> dict[str, float | int | None]:
        ranked = {q.key: [h.id for h in q.hits] for q in self.queries}
        return mean_average_precision(ranked, self.queries, self.config.k)

    def __call__(self, loaded: LoadedModel) -> dict[str, Any]:
        started = time.perf_counter()
        # All queries go to the backend in one call: its per-call timeout is for serving.
        reranker = self.config.reranker.model_copy(update={"backend": "transformers",
                                                           "timeout_s": 7 * 24 * 3600.0})
        backend = TransformersBackend(loaded, reranker)
        scorer = ListwiseScorer(self.builder.renderer, backend, self.builder.labels,
                                self.builder.label_token_ids, default_orders=reranker.orders)
        n = self.config.candidates
        tasks = [self.builder.task(q.text, q.hits[:n]) for q in self.queries]
        scores = asyncio.run(_score_all(scorer, tasks))
        figures: dict[str, Any] = {}
        for fusion in REPORTED_FUSIONS:
            ranked = {}
            for query, scored in zip(self.queries, scores, strict=True):
                head = query.hits[:n]
                order, _ = fused_order([h.score for h in head], scored.probabilities, fusion,
                                       self.config.fusion_weight)
                ranked[query.key] = ([head[i].id for i in order]
                                     + [h.id for h in query.hits[n:]])
            figures[fusion.value] = mean_average_precision(ranked, self.queries, self.config.k)
        self.seconds.append(time.perf_counter() - started)
        return figures


async def _score_all(scorer: ListwiseScorer, tasks: Sequence[ListwiseTask]) -> list[Any]:
    await scorer.backend.start()
    try:
        return await scorer.score(tasks)
    finally:
        await scorer.close()


# ---------------------------------------------------------------- training


def _collate(batch: Sequence[Example]) -> dict[str, Any]:
    import torch

    return {"prompts": [e.prompt_token_ids for e in batch],
            "label_ids": [e.label_token_ids for e in batch],
            "targets": torch.tensor([e.target for e in batch], dtype=torch.long)}


def listwise_loss(model: Any, inputs: dict[str, Any], pad_token_id: int, device: Any) -> Any:
    """Cross-entropy of the right label under serving's label distribution."""
    import torch

    last = last_logits(model, inputs["prompts"], pad_token_id, str(device))
    reads = [LabelRead(p, ids) for p, ids in zip(inputs["prompts"], inputs["label_ids"],
                                                   strict=True)]
    logprobs = label_log_softmax(last, reads)
    targets = inputs["targets"].tolist()
    return -torch.stack([row[t] for row, t in zip(logprobs, targets, strict=True)]).mean()


def _lora(model: Any, config: RerankerTrainingConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    layers = model.config.num_hidden_layers
    chosen = (list(range(max(0, layers - config.lora_layers), layers)) if config.lora_layers
              else None)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules="all-linear", layers_to_transform=chosen,
                      task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def _trainable(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def _select_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def _eval_subset(split: Split, limit: int, seed: int) -> set[str]:
    """Whole validation questions, drawn in a seeded order until ``limit`` queries."""
    by_group: dict[str, int] = {}
    for pair in split.validation:
        by_group[pair.group] = by_group.get(pair.group, 0) + 1
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)
    chosen: set[str] = set()
    total = 0
    for group in groups:
        if total >= limit:
            break
        chosen.add(group)
        total += by_group[group]
    return chosen


def train_reranker(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
                   config: RerankerTrainingConfig, train_file: Path, train_format: str,
                   instruction: str | None = None) -> dict[str, Any]:
    """Train, save the merged model to ``config.output_dir``, evaluate and write the report."""
    config.check()
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from reranker.models import resolve_model
    from reranker.prompt import load_tokenizer
    from retriever import Embedder, build_collection, load_collection
    from retriever.index import Hit
    from retriever.training import (
        check_positives,
        prepare_output,
        split_pairs,
        validation_set,
        write_validation_file,
    )
    from retriever.training_components import peak_rss_mib

    check_positives(pairs, entries)
    output = Path(config.output_dir)
    prepare_output(output, config.overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    seconds: dict[str, Any] = {}
    device = _select_device(config.device)
    torch.manual_seed(config.seed)

    # -- the split: by question, and the validation questions that are evaluated
    split = split_pairs(pairs, config.validation_fraction, seed=config.seed)
    eval_groups = _eval_subset(split, config.eval_queries, config.seed)
    validation = validation_set(replace(split, validation=[p for p in split.validation
                                                           if p.group in eval_groups]))
    train_pairs = list(split.train)
    random.Random(config.seed).shuffle(train_pairs)
    train_pairs = train_pairs[: config.examples]
    validation_path = write_validation_file(train_file, train_format, eval_groups, output)

    # -- candidates, retrieved as the service retrieves them
    stage = time.perf_counter()
    embedder = Embedder.load(config.retriever, "cpu" if device == "cpu" else "auto")
    depth = max(config.k, config.candidates)
    with tempfile.TemporaryDirectory(prefix="rankd-rerank-train-") as tmp:
        catalogue = load_collection(build_collection(list(entries), embedder, tmp, "catalogue",
                                                     show_progress=config.progress))
        train_hits = catalogue.search(embedder.encode([p.query for p in train_pairs]),
                                      config.candidates)
        keys = sorted(validation.queries)
        eval_hits = catalogue.search(embedder.encode([validation.queries[k] for k in keys]),
                                     depth)
    # A positive the retriever missed joins the candidates as itself, with no retrieval score.
    by_id = {e.id: Hit(e.id, e.text, 0.0) for e in entries}
    seconds["retrieval"] = round(time.perf_counter() - stage, 1)

    # -- the model and the serving prompts
    location = resolve_model(config.reranker.model or "", config.reranker.cache_dir)
    tokenizer = load_tokenizer(location)
    builder = PromptBuilder(tokenizer, config.reranker,
                            instruction or config.reranker.instruction)
    examples, stats = build_examples(train_pairs, train_hits, by_id, builder, config)
    if not examples:
        raise RerankerTrainingError("no training examples remain (every positive was missing "
                                    "or every prompt was over --max-tokens)")
    trained_ids = {e.positive_id for e in examples}
    queries = [EvalQuery(k, validation.queries[k], frozenset(validation.relevant[k]), list(hits),
                         bool(validation.relevant[k] & trained_ids))
               for k, hits in zip(keys, eval_hits, strict=True)]
    evaluator = RerankEvaluator(queries, builder, config)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = model.to(device)
    if config.method is TuningMethod.LORA:
        model = _lora(model, config)
    trainable, total = _trainable(model)
    log.info("%d of %d parameters train (%s)", trainable, total, config.method)

    def evaluate() -> dict[str, Any]:
        model.eval()
        try:
            inner = model.get_base_model() if config.method is TuningMethod.LORA else model
            return evaluator(LoadedModel(inner, device, int(pad),
                                         DtypeChoice("float32", "the weights in training")))
        finally:
            model.train()

    retrieval_only = evaluator.retrieval_only()
    stage = time.perf_counter()
    base = evaluate()  # LoRA starts at zero: the peft model is the base model here
    seconds["evaluate_base"] = round(time.perf_counter() - stage, 1)

    steps_per_epoch = max(1, -(-len(examples) // (config.batch_size
                                                 * config.gradient_accumulation)))
    total_steps = max(1, round(steps_per_epoch * config.epochs))
    curve_steps = sorted({max(1, round(total_steps * (i + 1) / (config.curve_points + 1)))
                          for i in range(config.curve_points)} - {total_steps})
    curve: list[dict[str, Any]] = [{"step": 0, "examples": 0, **base}]

    class Curve(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step in curve_steps:
                seen = state.global_step * config.batch_size * config.gradient_accumulation
                curve.append({"step": state.global_step, "examples": min(seen, len(examples)
                                                                         * config.epochs),
                              **evaluate()})
                log.info("step %d: MAP@%d %s", state.global_step, config.k,
                         curve[-1][Fusion.NONE.value]["map"])

    class ListwiseTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # The loss is a mean over the batch; the Trainer averages over accumulation.
            self.model_accepts_loss_kwargs = False

        def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            loss = listwise_loss(model, inputs, int(pad), self.args.device)
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
    trainer = ListwiseTrainer(model=model, args=args, train_dataset=examples,
                              data_collator=_collate, callbacks=[Curve()])
    stage = time.perf_counter()
    evaluations_before = len(evaluator.seconds)
    trainer.train()
    curve_seconds = sum(evaluator.seconds[evaluations_before:])
    # The learning curve's evaluations run inside train(); they are not training time.
    seconds["train"] = round(time.perf_counter() - stage - curve_seconds, 1)
    seconds["evaluate_curve"] = round(curve_seconds, 1)
    seconds["train_per_example"] = round(seconds["train"] / (len(examples) * config.epochs), 2)

    # -- the merged model, written as RANKD_RERANKER_MODEL, vLLM and `rankd quantize` load it
    stage = time.perf_counter()
    merged = model.merge_and_unload() if config.method is TuningMethod.LORA else model
    merged.save_pretrained(str(output), safe_serialization=True)
    tokenizer.save_pretrained(str(output))
    seconds["save"] = round(time.perf_counter() - stage, 1)

    # -- evaluate what was written, loaded the way `rankd serve` loads it
    stage = time.perf_counter()
    served = config.reranker.model_copy(update={"model": str(output), "backend": "transformers",
                                                "device": device})
    fine_tuned = evaluator(TransformersBackend.load(served, tokenizer))
    seconds["evaluate_fine_tuned"] = round(time.perf_counter() - stage, 1)
    curve.append({"step": trainer.state.global_step,
                  "examples": round(len(examples) * config.epochs), **fine_tuned})
    seconds["evaluations"] = [round(s, 1) for s in evaluator.seconds]
    seconds["total"] = round(time.perf_counter() - started, 1)
    seconds["cpu_total"] = round(time.process_time() - cpu_started, 1)

    report: dict[str, Any] = {
        "status": "complete",
        "base_model": config.reranker.model,
        "output": str(output.resolve()),
        "validation_file": str(validation_path.resolve()),
        "device": device,
        "config": _plain(asdict(config)),
        "instruction": builder.instruction,
        "parameters": {"trainable": trainable, "total": total},
        "split": {"pairs": len(pairs), "train_pairs": len(split.train),
                  "validation_pairs": len(split.validation),
                  "validation_questions": len({p.group for p in split.validation}),
                  "evaluated_questions": len(eval_groups)},
        "examples": stats.summary(),
        "trained_groups": sorted({p.group for p in train_pairs}),
        "validation_groups": sorted({p.group for p in split.validation}),
        "retrieval_only": retrieval_only,
        "base": base,
        "fine_tuned": fine_tuned,
        "learning_curve": curve,
        "train_loss": [{"step": e["step"], "loss": round(e["loss"], 4)}
                       for e in trainer.state.log_history if "loss" in e],
        "seconds": seconds,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if on_gpu:
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
