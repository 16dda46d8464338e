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
from typing import Any

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation import BaseEvaluator
from sentence_transformers.base.sampler import DefaultBatchSampler
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from retriever.evaluation import summarize

log = logging.getLogger(__name__)

SUBSETS = ("seen", "unseen")


def peak_rss_mib() -> float:
    """The process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class SeenUnseenEvaluator(BaseEvaluator):
    """MAP@k and recall@k on the validation queries: overall, seen and unseen.

    A query is *seen* when one of its relevant ids is a positive in the training pairs. The
    catalogue and the queries are encoded once per call, each query's top k is the catalogue
    ranked by cosine similarity (the retriever's inner product of unit vectors), and the
    figures are ``retriever.evaluation.summarize``'s, as `rankd eval` and the reranker's
    trainer compute them.
    """

    def __init__(self, corpus: dict[str, str], queries: dict[str, str],
                 relevant: dict[str, set[str]], seen_queries: set[str], *, k: int = 25,
                 batch_size: int = 64, name: str = "validation") -> None:
        super().__init__()
        if not queries:
            raise ValueError("the validation set has no queries")
        self.k = k
        self.name = name
        self.batch_size = batch_size
        self.corpus_ids = list(corpus)
        self.corpus = list(corpus.values())
        self.queries = queries
        self.relevant = relevant
        self.seen = seen_queries & set(queries)
        self.map_key = f"{name}_map@{k}"
        self.primary_metric = self.map_key
        self.seconds: list[float] = []

    def ranked(self, model: SentenceTransformer) -> dict[str, list[str]]:
        """Each query's top k catalogue ids by cosine similarity."""
        keys = list(self.queries)
        with torch.inference_mode():
            documents = torch.nn.functional.normalize(model.encode_document(
                self.corpus, batch_size=self.batch_size, convert_to_tensor=True), dim=-1)
            queries = torch.nn.functional.normalize(model.encode_query(
                [self.queries[key] for key in keys], batch_size=self.batch_size,
                convert_to_tensor=True), dim=-1)
            top = torch.topk(queries @ documents.T, min(self.k, len(self.corpus)), dim=-1)
        return {key: [self.corpus_ids[i] for i in row]
                for key, row in zip(keys, top.indices.tolist(), strict=True)}

    def __call__(self, model: SentenceTransformer, output_path: str | None = None,  # type: ignore[override]
                 epoch: float = -1, steps: int = -1) -> dict[str, float]:
        started = time.perf_counter()
        ranked = self.ranked(model)
        figures = summarize(ranked, self.relevant, self.k, self.seen)
        metrics: dict[str, float] = {
            self.map_key: float(figures["map"] or 0.0),
            f"{self.name}_recall@{self.k}": float(figures["recall"] or 0.0),
        }
        for subset in SUBSETS:
            keys = [q for q in self.queries if (q in self.seen) == (subset == "seen")]
            metrics[f"{self.name}_{subset}_queries"] = float(len(keys))
            if keys:
                part = summarize(ranked, {q: self.relevant[q] for q in keys}, self.k)
                metrics[f"{self.name}_{subset}_map@{self.k}"] = float(part["map"] or 0.0)
                metrics[f"{self.name}_{subset}_recall@{self.k}"] = float(part["recall"] or 0.0)
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
