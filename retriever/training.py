"""Fine-tune the retriever's embedder on (query, catalogue entry) pairs.

Contrastive training with sentence-transformers' trainer: MultipleNegativesRankingLoss (or its
cached variant) over in-batch negatives plus hard negatives that the base model itself ranks
highly in the catalogue index. Validation is split by question (a group of pairs), scored with
MAP@k and recall@k each epoch, and reported separately for queries whose positive was or was
not trained on. The output directory is a sentence-transformers model that
``rankd index build --model DIR`` and ``RANKD_EMBEDDER_MODEL=DIR`` load.

Reading, splitting and mining are plain functions usable (and tested) without the trainer;
the trainer stack is imported only inside :func:`train_retriever`.
"""

from __future__ import annotations

import json
import logging
import math
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retriever.catalog import CatalogEntry
from retriever.embedder import DEFAULT_EMBEDDER, Embedder
from retriever.index import Collection, build_collection, load_collection
from retriever.pairs import (
    REPORT_FILE,
    Split,
    TrainingError,
    TrainingPair,
    check_positives,
    cross_fit_record,
    prepare_output,
    require_positive,
    split_pairs,
    validation_set,
    with_train_fraction,
    without_fold,
)
from runtime.paths import select_device

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from torch import nn

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


# ---------------------------------------------------------------- hard negatives


class NegativeSampling(StrEnum):
    TOP = "top"  # the best-ranked eligible entries in the window
    RANDOM = "random"  # a seeded random draw from the eligible entries in the window


def parse_window(text: str) -> tuple[int, int]:
    """``"5-50"`` -> (5, 50): 1-based, inclusive ranks in the base model's retrieval."""
    first, sep, last = text.partition("-")
    try:
        window = (int(first), int(last))
    except ValueError:
        window = (0, 0)
    if not sep or window[0] < 1 or window[1] < window[0]:
        raise TrainingError(f"negative window {text!r} must look like FIRST-LAST with 1 <= FIRST <= LAST")
    return window


def mine_hard_negatives(pairs: Sequence[TrainingPair], collection: Collection, embedder: Embedder,
                        *, window: tuple[int, int], count: int,
                        sampling: NegativeSampling = NegativeSampling.TOP,
                        exclude_ids: frozenset[str] = frozenset(), seed: int = 0,
                        show_progress: bool = False) -> list[list[str]]:
    """Catalogue ids of ``count`` hard negatives for each pair, mined from ``collection``.

    Candidates are the base embedder's hits at ranks ``window`` (1-based, inclusive). Never
    chosen: any positive of the same query text (so a query with several labels gets none of
    them as negatives), any entry whose text equals one of those positives, and
    ``exclude_ids`` (held-out ids). When the window holds too few eligible entries the next
    ranks after it fill in.
    """
    if count < 1:
        raise TrainingError(f"negatives per query must be at least 1, got {count}")
    by_id = {e.id: e for e in collection.entries}
    positives: dict[str, set[str]] = defaultdict(set)
    for pair in pairs:
        positives[pair.query].add(pair.positive_id)
    texts = sorted(positives)
    # Deep enough that every exclusion can fall inside the window and still leave ``count``.
    copies = len(collection) - len({e.text for e in collection.entries})
    depth = min(len(collection), window[1] + count + len(exclude_ids) + copies
                + max(map(len, positives.values())))
    vectors = embedder.encode(texts, show_progress=show_progress)
    hits = dict(zip(texts, collection.search(vectors, depth), strict=True))
    rng = random.Random(seed)
    negatives = []
    for pair in pairs:
        banned_ids = positives[pair.query] | exclude_ids
        banned_texts = {by_id[i].text for i in positives[pair.query] if i in by_id}
        eligible = [(rank, hit.id) for rank, hit in enumerate(hits[pair.query], 1)
                    if rank >= window[0] and hit.id not in banned_ids and hit.text not in banned_texts]
        inside = [i for rank, i in eligible if rank <= window[1]]
        after = [i for rank, i in eligible if rank > window[1]]
        if sampling is NegativeSampling.RANDOM:
            chosen = rng.sample(inside, min(count, len(inside)))
        else:
            chosen = inside[:count]
        chosen += after[: count - len(chosen)]
        if len(chosen) < count:
            raise TrainingError(
                f"the catalogue ({len(collection)} entries) has too few eligible entries from rank "
                f"{window[0]} on for {count} negatives per query; lower --negatives or the window"
            )
        negatives.append(chosen)
    return negatives


# ---------------------------------------------------------------- configuration


class LossKind(StrEnum):
    MNRL = "mnrl"  # MultipleNegativesRankingLoss
    CACHED = "cached"  # CachedMultipleNegativesRankingLoss: big batches in small memory


def _mnrl(model: SentenceTransformer, config: TrainingConfig) -> nn.Module:
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    return MultipleNegativesRankingLoss(model, scale=config.scale)


def _cached_mnrl(model: SentenceTransformer, config: TrainingConfig) -> nn.Module:
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
    )

    return CachedMultipleNegativesRankingLoss(model, scale=config.scale,
                                              mini_batch_size=config.mini_batch_size)


LOSSES: dict[LossKind, Callable[[SentenceTransformer, TrainingConfig], nn.Module]] = {
    LossKind.MNRL: _mnrl,
    LossKind.CACHED: _cached_mnrl,
}


class SamplerKind(StrEnum):
    LENGTH_GROUPED = "length-grouped"  # no duplicate texts, similar query lengths: less padding
    NO_DUPLICATES = "no-duplicates"  # sentence-transformers' NoDuplicatesBatchSampler


def _batch_sampler(kind: SamplerKind) -> Any:
    """The ``batch_sampler`` value for the training arguments."""
    from sentence_transformers.base.sampler import BatchSamplers

    from retriever.training_components import LengthGroupedNoDuplicatesBatchSampler

    samplers: dict[SamplerKind, Any] = {
        SamplerKind.LENGTH_GROUPED: LengthGroupedNoDuplicatesBatchSampler,
        SamplerKind.NO_DUPLICATES: BatchSamplers.NO_DUPLICATES,
    }
    return samplers[kind]


@dataclass(frozen=True)
class TrainingConfig:
    """Options of one training run. Defaults fit Eedi's train.csv on 2 CPU cores."""

    output_dir: Path
    model: str = DEFAULT_EMBEDDER
    device: str = "auto"
    epochs: float = 2.0
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    batch_size: int = 32
    seed: int = 42
    sampler: SamplerKind = SamplerKind.LENGTH_GROUPED
    loss: LossKind = LossKind.MNRL
    mini_batch_size: int = 16
    scale: float = 20.0
    negatives: int = 1
    negative_window: tuple[int, int] = (5, 50)
    negative_sampling: NegativeSampling = NegativeSampling.TOP
    validation_fraction: float = 0.2
    # Questions kept from training and from every choice, for the final report (test.csv).
    test_fraction: float = 0.2
    # A learning curve's point: this share of the training questions.
    train_fraction: float = 1.0
    # Mine the hard negatives with this model instead of the base (a second round: the
    # fine-tuned model's own mistakes); None: the base model.
    negative_model: str | None = None
    holdout_fraction: float = 0.0
    # Cross-fitting: leave out the training questions of fold ``fold`` of ``folds`` (0: none),
    # so that `train-reranker --fold-retrievers` gets that fold's candidates as served.
    folds: int = 0
    fold: int = 0
    k: int = 25
    eval_batch_size: int = 64
    save_total_limit: int = 2
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        positive = {"epochs": self.epochs, "learning rate": self.learning_rate,
                    "batch size": self.batch_size, "mini-batch size": self.mini_batch_size,
                    "negatives": self.negatives, "k": self.k,
                    "eval batch size": self.eval_batch_size, "scale": self.scale,
                    "save total limit": self.save_total_limit}
        require_positive(positive, TrainingError)
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingError(f"warm-up ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.batch_size < 2:
            raise TrainingError("batch size must be at least 2: the loss needs in-batch negatives")
        if not 0 < self.train_fraction <= 1:
            raise TrainingError(f"--train-fraction must be in (0, 1], got {self.train_fraction}")
        if self.folds and (self.folds < 2 or not 0 <= self.fold < self.folds):
            raise TrainingError(f"--fold must be in [0, --folds) with --folds at least 2, got "
                                f"fold {self.fold} of {self.folds}")


# ---------------------------------------------------------------- training


def _train_dataset(split: Split, negatives: list[list[str]], entries: Sequence[CatalogEntry]) -> Any:
    from datasets import Dataset

    text = {e.id: e.text for e in entries}
    columns: dict[str, list[str]] = {
        "anchor": [p.query for p in split.train],
        "positive": [text[p.positive_id] for p in split.train],
    }
    for n in range(len(negatives[0])):
        columns[f"negative_{n + 1}"] = [text[ids[n]] for ids in negatives]
    return Dataset.from_dict(columns)


def _round(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}


def train_retriever(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
                    config: TrainingConfig) -> dict[str, Any]:
    """Train, keep the best epoch by validation MAP@k, save it to ``config.output_dir``.

    Returns (and writes to ``output_dir/training_report.json``) the split sizes, zero-shot and
    fine-tuned validation metrics (overall, seen, unseen), per-epoch metrics and timings and
    the peak memory.
    """
    config.check()
    check_positives(pairs, entries)
    output = Path(config.output_dir)
    prepare_output(output, config.overwrite)
    started = time.perf_counter()
    cpu_started = time.process_time()

    import torch
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    from retriever.training_components import EpochTimer, SeenUnseenEvaluator, peak_rss_mib

    # Its six INFO lines per subset and evaluation would bury the progress bar; the evaluator
    # here logs one line per evaluation instead.
    logging.getLogger("sentence_transformers.sentence_transformer.evaluation."
                      "information_retrieval").setLevel(logging.WARNING)

    split = split_pairs(pairs, config.validation_fraction, config.holdout_fraction, config.seed,
                        config.test_fraction)
    all_train = len(split.train)
    if config.folds:
        split = without_fold(split, config.folds, config.fold, config.seed)
    split = with_train_fraction(split, config.train_fraction, config.seed)
    log.info("split: %d training pairs, %d validation pairs, %d test pairs; %d ids held out "
             "(%d pairs dropped)", len(split.train), len(split.validation), len(split.test),
             len(split.held_out_ids), split.dropped_pairs)
    device = select_device(config.device)
    base = Embedder.load(config.model, device, config.eval_batch_size)
    model = base.model

    mining_started = time.perf_counter()
    miner = (Embedder.load(config.negative_model, device, config.eval_batch_size)
             if config.negative_model else base)
    with tempfile.TemporaryDirectory(prefix="rankd-mining-") as tmp:
        catalogue = load_collection(build_collection(list(entries), miner, tmp, "catalogue",
                                                     show_progress=config.progress))
        negatives = mine_hard_negatives(
            split.train, catalogue, miner, window=config.negative_window, count=config.negatives,
            sampling=config.negative_sampling, exclude_ids=split.held_out_ids, seed=config.seed,
            show_progress=config.progress,
        )
    mining_seconds = time.perf_counter() - mining_started
    del miner

    validation = validation_set(split)
    evaluator = SeenUnseenEvaluator({e.id: e.text for e in entries}, validation.queries,
                                    validation.relevant, validation.seen, k=config.k,
                                    batch_size=config.eval_batch_size)
    zero_shot = evaluator(model)

    timer = EpochTimer()
    on_gpu = device.startswith("cuda")
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output / CHECKPOINT_DIR),
        num_train_epochs=config.epochs,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        warmup_steps=config.warmup_ratio,  # a float below 1 is a ratio of the total steps
        seed=config.seed,
        data_seed=config.seed,
        batch_sampler=_batch_sampler(config.sampler),
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=config.save_total_limit,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model=f"eval_{evaluator.primary_metric}",
        greater_is_better=True,
        logging_steps=max(1, math.ceil(len(split.train) / config.batch_size / 10)),
        disable_tqdm=not config.progress,
        report_to="none",
        use_cpu=not device.startswith(("cuda", "mps")),
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        dataloader_num_workers=0,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=_train_dataset(split, negatives, entries),
        loss=LOSSES[config.loss](model, config), evaluator=evaluator, callbacks=[timer],
    )
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    model.save_pretrained(str(output))

    # Evaluate what was written, loaded the way `rankd index build --model DIR` loads it.
    fine_tuned = evaluator(Embedder.load(str(output), device, config.eval_batch_size).model)
    epochs = [
        {"epoch": entry["epoch"], "step": entry["step"],
         **_round({k.removeprefix("eval_"): v for k, v in entry.items()
                   if k.startswith(f"eval_{evaluator.name}")})}
        for entry in trainer.state.log_history if f"eval_{evaluator.primary_metric}" in entry
    ]
    losses = [{"step": e["step"], "loss": round(e["loss"], 4)}
              for e in trainer.state.log_history if "loss" in e]
    best = trainer.state.best_model_checkpoint
    report: dict[str, Any] = {
        "status": "complete",
        "base_model": base.name,
        "output": str(output.resolve()),
        "device": device,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "pairs": {"total": len(pairs), "train": len(split.train),
                  "validation": len(split.validation), "test": len(split.test),
                  "dropped_held_out": split.dropped_pairs},
        "validation_queries": {"total": len(validation.queries), "seen": len(validation.seen),
                               "unseen": len(validation.queries) - len(validation.seen)},
        # Validation chose the checkpoint (and, across runs, the recipe); the test questions
        # were neither trained nor chosen on, and this run never scored them.
        "validation_groups": sorted({p.group for p in split.validation}),
        "test_groups": sorted({p.group for p in split.test}),
        "held_out_ids": sorted(split.held_out_ids),
        "cross_fit": (cross_fit_record(config.folds, config.fold, config.seed,
                                       config.validation_fraction, config.holdout_fraction,
                                       all_train - len(split.train), config.test_fraction)
                      if config.folds else None),
        "zero_shot": _round(zero_shot),
        "fine_tuned": _round(fine_tuned),
        "epochs": epochs,
        "train_loss": losses,
        "best_checkpoint": str(Path(best).resolve()) if best else None,
        "seconds": {
            "mining": round(mining_seconds, 1),
            "train_epochs": [round(s, 1) for s in timer.seconds],
            "evaluations": [round(s, 1) for s in evaluator.seconds],
            "train_total": round(train_seconds, 1),
            "total": round(time.perf_counter() - started, 1),
            # CPU time of this process (all threads): wall time on a shared machine is not
            # the whole story.
            "train_epochs_cpu": [round(s, 1) for s in timer.cpu_seconds],
            "cpu_total": round(time.process_time() - cpu_started, 1),
        },
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "peak_rss_mib_after_epoch": [round(m, 1) for m in timer.peak_rss_mib],
    }
    if on_gpu:
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


__all__ = [
    "LOSSES",
    "LossKind",
    "NegativeSampling",
    "SamplerKind",
    "TrainingConfig",
    "mine_hard_negatives",
    "parse_window",
    "train_retriever",
]
