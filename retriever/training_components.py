"""Training-time pieces that need the trainer stack: the validation evaluator, the batch
sampler and an epoch timer.

Kept apart from ``retriever.training`` so that reading, splitting and mining stay importable
without ``transformers``' trainer; this module is imported only when training runs.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.base.sampler import DefaultBatchSampler
from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator
from sentence_transformers.util import cos_sim
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

log = logging.getLogger(__name__)

SUBSETS = ("seen", "unseen")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SeenUnseenEvaluator(BaseEvaluator):
    """MAP@k and recall@k on the validation queries: overall, seen and unseen.

    A query is *seen* when one of its relevant ids is a positive in the training pairs. The
    catalogue is encoded once per call and each query once; each subset is scored by
    sentence-transformers' ``InformationRetrievalEvaluator`` with cosine similarity (the
    retriever's inner product of unit vectors), and the overall figures are the query-weighted
    means of the two subsets, which is exactly the mean over all queries.
    """

    def __init__(self, corpus: dict[str, str], queries: dict[str, str],
                 relevant: dict[str, set[str]], seen_queries: set[str], *, k: int = 25,
                 batch_size: int = 64, name: str = "validation") -> None:
        super().__init__()
        self.k = k
        self.name = name
        self.batch_size = batch_size
        self.counts: dict[str, int] = {}
        self.evaluators: dict[str, InformationRetrievalEvaluator] = {}
        for subset in SUBSETS:
            wanted = {q for q in queries if (q in seen_queries) == (subset == "seen")}
            self.counts[subset] = len(wanted)
            if not wanted:
                continue
            self.evaluators[subset] = InformationRetrievalEvaluator(
                queries={q: queries[q] for q in wanted},
                corpus=dict[str, Any](corpus),
                relevant_docs={q: relevant[q] for q in wanted},
                mrr_at_k=[k], ndcg_at_k=[k], accuracy_at_k=[k], precision_recall_at_k=[k],
                map_at_k=[k], batch_size=batch_size, name=f"{name}_{subset}",
                write_csv=False, score_functions={"cosine": cos_sim},
                main_score_function="cosine",
            )
        if not self.evaluators:
            raise ValueError("the validation set has no queries")
        self.corpus = list(corpus.values())
        self.map_key = f"{name}_map@{k}"
        self.primary_metric = self.map_key
        self.seconds: list[float] = []

    def __call__(self, model: SentenceTransformer, output_path: str | None = None,  # type: ignore[override]
                 epoch: float = -1, steps: int = -1) -> dict[str, float]:
        started = time.perf_counter()
        corpus_embeddings = model.encode_document(self.corpus, batch_size=self.batch_size,
                                                  convert_to_tensor=True)
        metrics: dict[str, float] = {}
        totals = {"map": 0.0, "recall": 0.0}
        for subset, evaluator in self.evaluators.items():
            with torch.inference_mode():
                scores = evaluator.compute_all_metrics(model, corpus_embeddings=corpus_embeddings)
            # Typed as flat floats upstream; it is {score function: {metric: {k: value}}}.
            cosine = cast(dict[str, Any], scores)["cosine"]
            subset_map = float(cosine["map@k"][self.k])
            subset_recall = float(cosine["recall@k"][self.k])
            metrics[f"{self.name}_{subset}_map@{self.k}"] = subset_map
            metrics[f"{self.name}_{subset}_recall@{self.k}"] = subset_recall
            totals["map"] += subset_map * self.counts[subset]
            totals["recall"] += subset_recall * self.counts[subset]
        total = sum(self.counts.values())
        metrics[f"{self.name}_map@{self.k}"] = totals["map"] / total
        metrics[f"{self.name}_recall@{self.k}"] = totals["recall"] / total
        for subset in SUBSETS:
            metrics[f"{self.name}_{subset}_queries"] = float(self.counts[subset])
        self.seconds.append(time.perf_counter() - started)
        log.info("validation after %s steps: MAP@%d %.4f, recall@%d %.4f (%.1fs)", steps, self.k,
                 metrics[self.map_key], self.k, metrics[f"{self.name}_recall@{self.k}"],
                 self.seconds[-1])
        return metrics


@dataclass
class EpochTimer(TrainerCallback):
    """Wall and CPU seconds of each training epoch (evaluation excluded), peak RSS after it."""

    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peak_rss_mib: list[float] = field(default_factory=list)
    _started: tuple[float, float] = (0.0, 0.0)

    def on_epoch_begin(self, args: TrainingArguments, state: TrainerState,
                       control: TrainerControl, **kwargs: Any) -> None:
        self._started = (time.perf_counter(), time.process_time())

    def on_epoch_end(self, args: TrainingArguments, state: TrainerState,
                     control: TrainerControl, **kwargs: Any) -> None:
        self.seconds.append(time.perf_counter() - self._started[0])
        self.cpu_seconds.append(time.process_time() - self._started[1])
        self.peak_rss_mib.append(peak_rss_mib())


class LengthGroupedNoDuplicatesBatchSampler(DefaultBatchSampler):
    """Batches with no text twice (across all columns) whose anchors have similar lengths.

    The no-duplicates rule is that of sentence-transformers' ``NoDuplicatesBatchSampler``: with
    in-batch negatives, a text repeated in a batch would be its own negative. On top of it,
    each epoch shuffles the rows, cuts them into pools of ``POOL_BATCHES`` batches, sorts each
    pool by anchor length and fills batches greedily in that order, then shuffles the batches.
    Queries are long and varied (Eedi: median 88 tokens, 99th percentile 246) and a batch is
    padded to its longest, so grouping lengths cuts the padding that a random batch carries.
    Rows of an unfinished batch move on to the next pool; see ``_place_leftovers`` for the end.
    """

    POOL_BATCHES = 16

    def __init__(self, dataset: Any, batch_size: int, drop_last: bool,
                 valid_label_columns: list[str] | None = None,
                 generator: torch.Generator | None = None, seed: int = 0) -> None:
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last,
                         valid_label_columns=valid_label_columns, generator=generator, seed=seed)
        skip = set(valid_label_columns or []) | {"dataset_name"}
        columns = {name: values for name, values in dataset.to_dict().items() if name not in skip}
        texts = list(zip(*columns.values(), strict=True))
        self.values = [frozenset(map(str, row)) for row in texts]
        self.lengths = [len(str(row[0])) for row in texts]
        self._plans: dict[int, list[list[int]]] = {}

    def _plan(self, epoch: int) -> list[list[int]]:
        if epoch not in self._plans:
            self._plans = {epoch: self._make_plan(epoch)}
        return self._plans[epoch]

    def _make_plan(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(len(self.values), generator=generator).tolist()
        pool_size = self.batch_size * self.POOL_BATCHES
        batches: list[list[int]] = []
        carried: list[int] = []  # rows of unfinished batches wait for the next pool
        for start in range(0, len(order), pool_size):
            pool = sorted(carried + order[start:start + pool_size], key=self.lengths.__getitem__)
            carried = []
            for batch in self._fill(pool):
                if len(batch) == self.batch_size:
                    batches.append(batch)
                else:
                    carried.extend(batch)
        batches += self._place_leftovers(carried, batches)
        if self.drop_last:
            batches = [b for b in batches if len(b) >= self.batch_size]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled]

    def _fill(self, rows: list[int]) -> Iterator[list[int]]:
        """Batches filled in ``rows`` order; a row that clashes waits for a later batch."""
        while rows:
            batch: list[int] = []
            seen: set[str] = set()
            rest = []
            for index in rows:
                if len(batch) < self.batch_size and seen.isdisjoint(self.values[index]):
                    batch.append(index)
                    seen |= self.values[index]
                else:
                    rest.append(index)
            yield batch
            rows = rest

    def _place_leftovers(self, rows: list[int], batches: list[list[int]]) -> list[list[int]]:
        """Rows no full batch took: into a full batch where they add no padding, else together.

        Leftovers are mostly rows whose text recurs many times (one Eedi misconception is the
        positive of 36 pairs). A full batch whose longest query is at least as long takes one
        when it does not clash, growing by at most a quarter; the rest form smaller batches.
        """
        limit = self.batch_size + max(1, self.batch_size // 4)
        values = [set().union(*(self.values[i] for i in b)) for b in batches]
        longest = [max(self.lengths[i] for i in b) for b in batches]
        unplaced = []
        for index in sorted(rows, key=self.lengths.__getitem__, reverse=True):
            fits = [(longest[n], n) for n, batch in enumerate(batches)
                    if len(batch) < limit and longest[n] >= self.lengths[index]
                    and values[n].isdisjoint(self.values[index])]
            if not fits:
                unplaced.append(index)
                continue
            n = min(fits)[1]  # the tightest fit keeps the longer batches for longer rows
            batches[n].append(index)
            values[n] |= self.values[index]
        return list(self._fill(sorted(unplaced, key=self.lengths.__getitem__)))

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._plan(self.epoch)

    def __len__(self) -> int:
        return len(self._plan(self.epoch))
