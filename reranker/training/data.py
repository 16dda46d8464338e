"""The split and the candidates: which pairs train, which validation questions choose the fusion
and which are reported, and each one's candidates as the service retrieves them."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from reranker.training.config import RerankerTrainingConfig

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.pairs import Split, TrainingPair, ValidationSet
    from retriever.vocabulary import Hit


@dataclass(frozen=True)
class TrainingData:
    split: Split
    train_pairs: list[TrainingPair]
    validation: ValidationSet  # the fusion's and the reported queries
    fusion_groups: set[str]  # questions the fusion is chosen on
    eval_groups: set[str]  # questions reported
    fusion_keys: list[str]  # their query keys, in a seeded order
    eval_keys: list[str]


def _draw_groups(split: Split, seed: int, *limits: int) -> list[set[str]]:
    """Whole validation questions in a seeded order, dealt out to one set per limit in turn,
    each until it holds ``limit`` queries (0: every question left)."""
    by_group: dict[str, int] = {}
    for pair in split.validation:
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
    """The retriever's split (the same function and seed, so a `rankd train-retriever` run
    with the same options trained on none of these validation questions), the training pairs
    drawn, the questions the fusion is chosen on, and the questions reported."""
    from retriever.pairs import TrainingError, split_pairs, validation_set

    split = split_pairs(pairs, config.validation_fraction, seed=config.seed)
    # The fusion's questions take at most half the validation queries: the rest are reported.
    fusion_queries = max(1, min(config.fusion_queries, len(split.validation) // 2))
    fusion_groups, eval_groups = _draw_groups(split, config.seed, fusion_queries,
                                              config.eval_queries)
    if not eval_groups:
        raise TrainingError(
            f"no validation questions are left to report after the {fusion_queries} queries "
            "the fusion is chosen on; raise --validation-fraction")
    validation = validation_set(replace(split, validation=[
        p for p in split.validation if p.group in fusion_groups | eval_groups]))
    train_pairs = list(split.train)
    random.Random(config.seed).shuffle(train_pairs)
    if config.examples:
        train_pairs = train_pairs[: config.examples]
    keys = sorted(validation.queries)
    random.Random(config.seed).shuffle(keys)
    return TrainingData(split, train_pairs, validation, fusion_groups, eval_groups,
                        [k for k in keys if validation.groups[k] in fusion_groups],
                        [k for k in keys if validation.groups[k] in eval_groups])


def retrieve_candidates(entries: Sequence[CatalogEntry], data: TrainingData,
                        config: RerankerTrainingConfig,
                        ) -> tuple[list[list[Hit]], dict[str, list[Hit]]]:
    """Each training pair's top N, and each validation query's top k by key, retrieved by
    ``config.retriever`` through the service's embedder settings (runtime, quantization,
    device), as the service will retrieve them."""
    from retriever import Embedder, build_collection, load_collection

    settings = config.retrieval
    embedder = Embedder.load(config.retriever, settings.embedder_device,
                             settings.embedder_chunk_size, settings.embedder_variant,
                             settings.embedder_cache_dir)
    depth = max(config.k, config.candidates)
    keys = data.fusion_keys + data.eval_keys
    with tempfile.TemporaryDirectory(prefix="rankd-rerank-train-") as tmp:
        catalogue = load_collection(build_collection(list(entries), embedder, tmp, "catalogue",
                                                     show_progress=config.progress))
        train_hits = catalogue.search(embedder.encode([p.query for p in data.train_pairs]),
                                      config.candidates)
        eval_hits = catalogue.search(
            embedder.encode([data.validation.queries[k] for k in keys]), depth)
    return train_hits, dict(zip(keys, eval_hits, strict=True))
