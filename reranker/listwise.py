"""The one label-logprob path: listwise prompts in two orders, label probabilities, averaging.

Every caller (/rank, /v1/rerank, /answer) describes its prompt as a ``ListwiseTask``; this module
renders it with the items in the given order and reversed, reads the next-token distribution
restricted to the label tokens from the backend, renormalises it over the labels, maps labels back
to items and averages the two orders to cancel position bias.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from reranker.backends import LabelLogprobBackend, LabelRead, MakeBatcher, backend_factory
from reranker.config import RerankerConfig
from reranker.errors import BackendError, RerankerConfigError, TooManyItemsError
from reranker.labels import label_token_ids
from reranker.prompt import PromptRenderer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListwiseTask:
    template: str
    fields: dict[str, str]
    items: list[str]
    item_ids: list[str] = field(default_factory=list)  # only reported in traces


@dataclass(frozen=True)
class OrderTrace:
    prompt: str
    labels: list[str]
    label_token_ids: list[int]
    item_ids: list[str]
    probabilities: list[float]  # label order, renormalised over the labels


@dataclass(frozen=True)
class ListwiseScores:
    probabilities: list[float]  # item order, the mean over both orders
    orders: list[OrderTrace]


def renormalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax of label logprobs: the label distribution, whatever the logprobs were over."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


class ListwiseScorer:
    def __init__(self, renderer: PromptRenderer, backend: LabelLogprobBackend, labels: list[str],
                 token_ids: list[int]) -> None:
        self.renderer = renderer
        self.backend = backend
        self.labels = labels
        self.label_token_ids = token_ids
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None

    @property
    def max_items(self) -> int:
        return len(self.labels)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    async def create(cls, backend_name: str, config: RerankerConfig,
                     make_batcher: MakeBatcher) -> ListwiseScorer:
        """Load the tokenizer, validate the labels (refusing to start if one is not a single
        token), then build and start the backend."""
        factory = backend_factory(backend_name)
        if not config.model:
            raise RerankerConfigError(
                f"RANKD_RERANKER_BACKEND={backend_name} needs RANKD_RERANKER_MODEL: the model "
                "(local directory or hub id) whose tokenizer renders the prompt"
            )
        tokenizer = load_tokenizer(config.model)
        labels = config.label_alphabet.labels()
        renderer = PromptRenderer(tokenizer, config.use_chat_template)
        # Labels are checked where the model writes them: right after the rendered prompt.
        token_ids = label_token_ids(tokenizer, labels, renderer.answer_context(config.rank_template))
        backend = await factory(config, tokenizer, make_batcher)
        try:
            await backend.start()
        except BaseException:
            await backend.close()
            raise
        log.info("reranker ready: backend %s, model %s, %d labels", backend.name, config.model,
                 len(labels))
        return cls(renderer, backend, labels, token_ids)

    def check_count(self, count: int, field_name: str = "candidates") -> None:
        if count > self.max_items:
            raise TooManyItemsError(count, self.max_items, field_name)

    def _orders(self, task: ListwiseTask) -> list[tuple[list[int], Any]]:
        n = len(task.items)
        labels = self.labels[:n]
        forward = list(range(n))
        orders = []
        for positions in (forward, forward[::-1]):
            prompt = self.renderer.render(task.template, task.fields,
                                          [task.items[p] for p in positions], labels)
            orders.append((positions, prompt))
        return orders

    async def score(self, tasks: Sequence[ListwiseTask]) -> list[ListwiseScores]:
        """Score every task; all prompts of all tasks go to the backend in one call."""
        for task in tasks:
            self.check_count(len(task.items))
        rendered = [self._orders(task) if task.items else [] for task in tasks]
        reads = [
            LabelRead(prompt.token_ids, self.label_token_ids[: len(task.items)])
            for task, orders in zip(tasks, rendered, strict=True)
            for _, prompt in orders
        ]
        if not reads:
            return [ListwiseScores([], []) for _ in tasks]
        try:
            logprobs = await self.backend.label_logprobs(reads)
        except BackendError as exc:
            self.last_error, self.last_error_at = f"{exc.reason}: {exc}", time.time()
            raise
        self.last_success_at = time.time()
        self.last_error = None
        results = []
        cursor = 0
        for task, orders in zip(tasks, rendered, strict=True):
            n = len(task.items)
            totals = [0.0] * n
            traces = []
            for positions, prompt in orders:
                probabilities = renormalise(logprobs[cursor])
                cursor += 1
                for label_index, item_index in enumerate(positions):
                    totals[item_index] += probabilities[label_index]
                traces.append(OrderTrace(
                    prompt=prompt.text,
                    labels=self.labels[:n],
                    label_token_ids=self.label_token_ids[:n],
                    item_ids=[task.item_ids[p] if task.item_ids else str(p) for p in positions],
                    probabilities=probabilities,
                ))
            results.append(ListwiseScores([t / len(orders) for t in totals], traces))
        return results

    async def health(self) -> str | None:
        """None when healthy; else why not. A failed call stays reported until one succeeds."""
        problem = await self.backend.health()
        if problem:
            return problem
        if self.last_error and (self.last_success_at or 0) < (self.last_error_at or 0):
            return f"last rerank call failed: {self.last_error}"
        return None

    async def close(self) -> None:
        await self.backend.close()
