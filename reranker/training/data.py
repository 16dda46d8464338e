"""The split and the candidates: which pairs train, which validation questions choose the fusion
and which are reported, and each one's candidates as the service retrieves them."""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.training.config import RerankerTrainingConfig, RerankerTrainingError

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.pairs import Split, TrainingPair, ValidationSet
    from retriever.search import Retriever
    from retriever.vocabulary import Hit


@dataclass(frozen=True)
class TrainingData:
    split: Split
    train_pairs: list[TrainingPair]
    validation: ValidationSet  # the fusion's and the reported queries
    fusion_groups: set[str]  # questions the fusion is chosen on (validation)
    eval_groups: set[str]  # questions reported: the test split's, else validation's others
    fusion_keys: list[str]  # their query keys, in a seeded order
    eval_keys: list[str]


def _draw_groups(pairs: Sequence[TrainingPair], seed: int, *limits: int) -> list[set[str]]:
    """Whole questions of ``pairs`` in a seeded order, dealt out to one set per limit in turn,
    each until it holds ``limit`` queries (0: every question left)."""
    by_group: dict[str, int] = {}
    for pair in pairs:
        by_group[pair.group] = by_group.get(pair.group, 0) + 1
    groups = sorted(by_group)
    random.Random(seed).shuffle(groups)
    dealt: list[set[str]] = []
    for limit in limits:
        chosen: set[str] = set()
        total = 0
        while groups and not (limit and total >= limit):
            group = groups.pop(0)
            chosen.add(group)
            total += by_group[group]
        dealt.append(chosen)
    return dealt


def split_for_training(pairs: Sequence[TrainingPair],
                       config: RerankerTrainingConfig) -> TrainingData:
    """The retriever's split (the same function, fractions and seed, so a `rankd
    train-retriever` run with the same options trained on none of these validation or test
    questions), the training pairs drawn, the questions the fusion is chosen on, and the
    questions reported.

    With a test split, validation chooses (``fusion_queries`` of it, 0: all) and the test
    questions, which no choice sees, are reported. Without one (``--test-fraction 0``) the
    fusion takes at most half the validation queries and the rest are reported."""
    from retriever.pairs import TrainingError, split_pairs, validation_set

    split = split_pairs(pairs, config.validation_fraction, seed=config.seed,
                        test_fraction=config.test_fraction)
    if split.test:
        (fusion_groups,) = _draw_groups(split.validation, config.seed, config.fusion_queries)
        (eval_groups,) = _draw_groups(split.test, config.seed, config.eval_queries)
    else:
        fusion_queries = max(1, min(config.fusion_queries or len(split.validation),
                                    len(split.validation) // 2))
        fusion_groups, eval_groups = _draw_groups(split.validation, config.seed,
                                                  fusion_queries, config.eval_queries)
    if not eval_groups:
        raise TrainingError(
            "no questions are left to report after those the fusion is chosen on; raise "
            "--validation-fraction or --test-fraction")
    chosen_and_reported = fusion_groups | eval_groups
    validation = validation_set(replace(split, validation=[
        p for p in [*split.validation, *split.test] if p.group in chosen_and_reported]))
    train_pairs = list(split.train)
    random.Random(config.seed).shuffle(train_pairs)
    if config.examples:
        train_pairs = train_pairs[: config.examples]
    keys = sorted(validation.queries)
    random.Random(config.seed).shuffle(keys)
    return TrainingData(split, train_pairs, validation, fusion_groups, eval_groups,
                        [k for k in keys if validation.groups[k] in fusion_groups],
                        [k for k in keys if validation.groups[k] in eval_groups])


@dataclass(frozen=True)
class FoldRetriever:
    fold: int
    model: str
    report: dict[str, Any]  # its training_report.json


def fold_retrievers(config: RerankerTrainingConfig) -> list[FoldRetriever]:
    """``config.fold_retrievers`` in fold order, each checked to have left out its own fold of
    this run's split (the same folds, seed, validation fraction and no withheld ids)."""
    from retriever.pairs import REPORT_FILE

    found: dict[int, FoldRetriever] = {}
    folds = len(config.fold_retrievers)
    expected = {"folds": folds, "seed": config.seed,
                "validation_fraction": config.validation_fraction,
                "test_fraction": config.test_fraction, "holdout_fraction": 0.0}
    for model in config.fold_retrievers:
        path = Path(model) / REPORT_FILE
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RerankerTrainingError(
                f"--fold-retrievers: {model} is not a `rankd train-retriever` output "
                f"({path}: {exc})") from exc
        cross_fit = report.get("cross_fit") or {}
        if not cross_fit:
            raise RerankerTrainingError(
                f"--fold-retrievers: {model} was trained without --folds; train one retriever "
                f"per fold with `rankd train-retriever --folds {folds} --fold I`")
        for key, value in expected.items():
            if cross_fit.get(key) != value:
                raise RerankerTrainingError(
                    f"--fold-retrievers: {model} has {key} {cross_fit.get(key)}, this run "
                    f"{value}; train its retrievers with the same --folds, --seed, "
                    "--validation-fraction and --test-fraction, and no "
                    "--holdout-misconceptions")
        fold = int(cross_fit["fold"])
        if fold in found:
            raise RerankerTrainingError(f"--fold-retrievers: {found[fold].model} and {model} "
                                        f"both left out fold {fold}")
        found[fold] = FoldRetriever(fold, model, report)
    return [found[f] for f in sorted(found)]


def _catalogue_retriever(model: str, entries: Sequence[CatalogEntry], directory: str,
                         config: RerankerTrainingConfig) -> Retriever:
    """``model`` over the catalogue (collection ``catalogue``), loaded through the service's
    embedder settings."""
    from retriever import Embedder, build_collection, load_collection
    from retriever.search import Retriever

    settings = config.retrieval
    embedder = Embedder.load(model, settings.embedder_device, settings.embedder_chunk_size,
                             settings.embedder_variant, settings.embedder_cache_dir)
    catalogue = load_collection(build_collection(list(entries), embedder, directory, "catalogue",
                                                 show_progress=config.progress))
    return Retriever(embedder, {"catalogue": catalogue})


def _search(retriever: Retriever, texts: list[str], n: int) -> list[list[Hit]]:
    from retriever.search import SearchQuery

    return retriever.search([SearchQuery(text, "catalogue", n) for text in texts])


def retrieve_candidates(entries: Sequence[CatalogEntry], data: TrainingData,
                        config: RerankerTrainingConfig, folds: Sequence[FoldRetriever] = (),
                        training: bool = True,
                        ) -> tuple[list[list[Hit]], dict[str, list[Hit]]]:
    """Each training pair's top N, and each validation query's top k by key, retrieved by
    ``config.retriever`` through the service's embedder settings (runtime, quantization,
    device), as the service will retrieve them; with ``folds``, a training pair's top N by
    the retriever of its fold, which never trained on it. ``training`` False: the validation
    queries' alone (an evaluation of a trained model on another retriever's candidates)."""
    from retriever.pairs import fold_of

    depth = max(config.k, config.candidates)
    keys = data.fusion_keys + data.eval_keys
    train_queries = [p.query for p in data.train_pairs] if training else []
    with tempfile.TemporaryDirectory(prefix="rankd-rerank-train-") as tmp:
        served = _catalogue_retriever(config.retriever, entries, f"{tmp}/served", config)
        eval_hits = _search(served, [data.validation.queries[k] for k in keys], depth)
        if not training:
            train_hits: list[list[Hit]] = []
        elif not folds:
            train_hits = _search(served, train_queries, config.candidates)
        else:
            del served
            train_hits = [[] for _ in train_queries]
            for retriever in folds:
                rows = [i for i, p in enumerate(data.train_pairs)
                        if fold_of(p.group, len(folds), config.seed) == retriever.fold]
                fold = _catalogue_retriever(retriever.model, entries,
                                            f"{tmp}/fold-{retriever.fold}", config)
                found = _search(fold, [train_queries[i] for i in rows], config.candidates)
                for i, hits in zip(rows, found, strict=True):
                    train_hits[i] = hits
    return train_hits, dict(zip(keys, eval_hits, strict=True))
