"""The one label-logprob path: listwise prompts in several orders, label probabilities, averaging.

Every caller (/rank, /v1/rerank, /answer) describes its prompt as a ``ListwiseTask``; this module
renders it with the items in each order of an order scheme (``order_permutations``), reads the
next-token distribution restricted to the label tokens from the backend, renormalises it over the
labels, maps labels back to items and averages the orders (``combine_orders``) to cancel
position bias.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from reranker.backends import BatchObserver, LabelLogprobBackend, LabelRead, backend_factory
from reranker.config import MAX_ORDERS, POINTWISE_LABELS, LongItems, RerankerConfig, Scoring
from reranker.errors import (
    BackendError,
    ItemTooLongError,
    PromptTooLongError,
    RerankerConfigError,
    TooManyItemsError,
)
from reranker.labels import POINTWISE_REMEDY, label_token_ids
from reranker.models import declared_context_length, resolve_model
from reranker.prompt import PromptRenderer, RenderedPrompt, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ListwiseTask:
    template: str
    fields: dict[str, str]
    items: list[str]
    item_ids: list[str] = field(default_factory=list)  # only reported in traces
    orders: int | None = None  # the order scheme (order_permutations); None: the scorer's default
    # Where errors point: the request field whose prompt is too long, and each item's own path
    # (default items[i]).
    prompt_field: str = "query"
    item_fields: list[str] = field(default_factory=list)
    # Cut the items, rather than refuse the task, when its prompt is longer than the model
    # reads (Cohere's truncation): each item at most this many tokens, then every item of a
    # prompt a fair share of what is left. None: refuse a prompt that is too long.
    fit_items_within: int | None = None

    def item_field(self, index: int) -> str:
        return self.item_fields[index] if self.item_fields else f"items[{index}]"

    @classmethod
    def for_query(cls, template: str, instruction: str, query: str, items: list[str],
                  item_ids: list[str] | None = None, orders: int | None = None,
                  item_fields: list[str] | None = None) -> ListwiseTask:
        """A rank task: the fields that /rank, /v1/rerank, calibration and training all fill."""
        return cls(template=template, fields={"instruction": instruction, "query": query},
                   items=items, item_ids=item_ids or [], orders=orders,
                   item_fields=item_fields or [])


@dataclass(frozen=True)
class PromptLimits:
    """What any rendered prompt, and any item in it, may hold."""

    max_prompt_tokens: int = 1 << 30
    max_item_tokens: int = 0  # 0: no limit of its own
    long_items: LongItems = LongItems.TRUNCATE
    prompt_setting: str = "RANKD_RERANKER_MAX_PROMPT_TOKENS"


def context_length(location: str) -> int:
    """The model's context length in tokens, from its config (max_position_embeddings)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise RerankerConfigError(
            f"cannot read the context length of {location!r} ({exc}); set "
            "RANKD_RERANKER_MAX_PROMPT_TOKENS") from exc
    length = declared_context_length(config)
    if length is None:
        raise RerankerConfigError(f"the config of {location!r} names no context length; set "
                                  "RANKD_RERANKER_MAX_PROMPT_TOKENS")
    return length


@dataclass(frozen=True)
class PointwiseReading:
    """How a pointwise prompt is rendered and read: its template and the yes/no label tokens."""

    template: str
    labels: list[str]
    token_ids: list[int]


@dataclass(frozen=True)
class OrderTrace:
    positions: list[int]  # the item index behind each label
    prompt: str
    labels: list[str]
    label_token_ids: list[int]
    item_ids: list[str]
    probabilities: list[float]  # label order, renormalised over the labels


@dataclass(frozen=True)
class ListwiseScores:
    probabilities: list[float]  # item order, the mean over the orders
    spreads: list[float]  # item order, max - min of the item's probability over the orders
    orders: list[OrderTrace]
    # Item order: the item's least probability over the orders, the share of its probability
    # that no order's position can explain (pointwise: its probability).
    consensus: list[float] = field(default_factory=list)
    # How far the orders prefer the same items: the mean Spearman correlation of the items'
    # probabilities between orders (``rank_agreement``). Near 1 for a model that reads
    # content, near 0 for noise, negative for one that reads positions; None with a single
    # order (or pointwise), which cannot tell content from position.
    agreement: float | None = None
    # Items cut to fit (``ListwiseTask.fit_items_within``): item index -> (tokens, kept tokens).
    truncated: dict[int, tuple[int, int]] = field(default_factory=dict)


__all__ = ["MAX_ORDERS", "ListwiseScorer", "ListwiseScores", "ListwiseTask", "OrderTrace",
           "PointwiseReading", "combine_orders", "load_model_tokenizer", "order_consensus",
           "order_evidence", "order_permutations", "render_order", "renormalise",
           "start_backend"]

T = TypeVar("T")


def order_permutations(n: int, orders: int) -> list[list[int]]:
    """The item positions of each order of a scheme, the forward order first.

    ``1``: retrieval (input) order. ``2``: forward and reversed. ``k >= 3``: ``min(k, n)`` cyclic
    rotations with evenly spaced offsets, so each item visits ``k`` positions; with ``k = n``
    every item holds every position once and a purely positional prior cancels exactly.
    """
    if orders < 1:
        raise ValueError(f"orders must be at least 1, got {orders}")
    forward = list(range(n))
    if n <= 1 or orders == 1:
        return [forward]
    if orders == 2:
        return [forward, forward[::-1]]
    k = min(orders, n)
    offsets = sorted({round(j * n / k) % n for j in range(k)})
    return [[(i + offset) % n for i in range(n)] for offset in offsets]


def combine_orders(n: int, permutations: Sequence[Sequence[int]],
                   probabilities: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Each item's mean probability over the orders, and its spread (max - min) across them.

    ``probabilities[o][j]`` is the probability of the label at position ``j`` of order ``o``,
    whose item is ``permutations[o][j]``.
    """
    seen: list[list[float]] = [[] for _ in range(n)]
    for positions, probs in zip(permutations, probabilities, strict=True):
        for item, p in zip(positions, probs, strict=True):
            seen[item].append(p)
    means = [sum(ps) / len(ps) for ps in seen]
    spreads = [max(ps) - min(ps) for ps in seen]
    return means, spreads


def order_consensus(n: int, permutations: Sequence[Sequence[int]],
                    probabilities: Sequence[Sequence[float]]) -> tuple[list[float], float | None]:
    """Each item's least probability over the orders, and their sum (None for one order): 1
    when every order gives each item the same probability, which a model that spreads its
    probability evenly also does. Arguments as for ``combine_orders``."""
    least = [1.0] * n
    for positions, probs in zip(permutations, probabilities, strict=True):
        for item, p in zip(positions, probs, strict=True):
            least[item] = min(least[item], p)
    return least, (sum(least) if len(permutations) > 1 else None)


def order_evidence(n: int, permutations: Sequence[Sequence[int]],
                   probabilities: Sequence[Sequence[float]]
                   ) -> tuple[list[float], list[float], list[float], float | None]:
    """What the orders of one task say about its items, as the scorer reports it: each item's
    mean probability, its spread and its least probability over the orders, and the orders'
    agreement (``rank_agreement``). The benches read stored orders through this too."""
    means, spreads = combine_orders(n, permutations, probabilities)
    least, _ = order_consensus(n, permutations, probabilities)
    return means, spreads, least, rank_agreement(n, permutations, probabilities)


def _average_ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (ties at their average rank); 0 when either is constant."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else 0.0


def rank_agreement(n: int, permutations: Sequence[Sequence[int]],
                   probabilities: Sequence[Sequence[float]]) -> float | None:
    """The mean Spearman correlation, over pairs of orders, of the items' probabilities: near 1
    when every order prefers the same items, near 0 for noise, negative when each order
    prefers whatever stands at one position (None for one order)."""
    if len(permutations) < 2 or n < 2:
        return None
    by_order = []
    for positions, probs in zip(permutations, probabilities, strict=True):
        item_probs = [0.0] * n
        for item, p in zip(positions, probs, strict=True):
            item_probs[item] = p
        by_order.append(item_probs)
    pairs = [(a, b) for i, a in enumerate(by_order) for b in by_order[i + 1:]]
    return sum(spearman(a, b) for a, b in pairs) / len(pairs)


def render_order(renderer: PromptRenderer, labels: Sequence[str], task: ListwiseTask,
                 positions: Sequence[int]) -> RenderedPrompt:
    """The prompt of ``task`` with its items in ``positions`` order, labelled from the first
    label on: what the model reads when serving, and what it is trained on."""
    return renderer.render(task.template, task.fields, [task.items[p] for p in positions],
                           list(labels[: len(positions)]))


def _water_fill(lengths: Sequence[int], room: int) -> list[int]:
    """The largest lengths, each at most its own, that add up to at most ``room``: one level
    for all that are longer, the room shorter ones leave given to them."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    kept = list(lengths)
    left = room
    for position, i in enumerate(order):
        share = left // (len(order) - position)
        if lengths[i] <= share:
            left -= lengths[i]
            continue
        for j in order[position:]:
            kept[j] = share
        break
    return kept


def renormalise(logprobs: Sequence[float]) -> list[float]:
    """Softmax of label logprobs: the label distribution, whatever the logprobs were over."""
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    total = sum(weights)
    return [w / total for w in weights]


async def load_model_tokenizer(config: RerankerConfig) -> tuple[str, Any]:
    """The model's directory and its tokenizer, off the loop. A GGUF file (or the embedded
    default) becomes a model directory once."""
    assert config.model, "RerankerConfig requires a model for every backend"
    location = await asyncio.to_thread(resolve_model, config.model, config.cache_dir)
    return location, await asyncio.to_thread(load_tokenizer, location)


async def start_backend(config: RerankerConfig, tokenizer: Any,
                        observer: BatchObserver | None = None) -> LabelLogprobBackend:
    """The configured backend (``config.model`` already a model directory), started."""
    backend = await backend_factory(config.backend)(config, tokenizer, observer)
    try:
        await backend.start()
    except BaseException:
        await backend.close()
        raise
    return backend


class ListwiseScorer:
    """Renders tasks, reads label logprobs from a backend and averages the orders.

    Rendering (the chat template and tokenization) runs on a tokenizer thread of its own, as
    vLLM's frontend does, so a long request never holds the event loop: a 1,000-document
    /v1/rerank renders about 80 prompts.
    """

    def __init__(self, renderer: PromptRenderer, backend: LabelLogprobBackend, labels: list[str],
                 token_ids: list[int], model: str = "", default_orders: int = 2,
                 pointwise: PointwiseReading | None = None,
                 limits: PromptLimits | None = None) -> None:
        self.limits = limits or PromptLimits()
        self.renderer = renderer
        self.model = model
        self.default_orders = default_orders
        self.backend = backend
        self.labels = labels
        self.label_token_ids = token_ids
        # Set when /rank and /v1/rerank score pointwise (RANKD_RERANKER_SCORING=pointwise).
        self.pointwise = pointwise
        self.last_error: str | None = None
        self.last_error_at: float | None = None
        self.last_success_at: float | None = None
        self._tokenizer_thread = ThreadPoolExecutor(max_workers=1,
                                                    thread_name_prefix="rankd-tokenizer")

    @property
    def max_items(self) -> int:
        return len(self.labels)

    @property
    def backend_name(self) -> str:
        return self.backend.name

    @classmethod
    async def create(cls, config: RerankerConfig, observer: BatchObserver | None = None,
                     backend: LabelLogprobBackend | None = None) -> ListwiseScorer:
        """Load the tokenizer, validate the labels (refusing to start if one is not a single
        token after either template's ending), then build and start the backend.

        ``backend``, when given, is a started backend that scores elsewhere (a Ray Serve
        deployment running ``start_backend``); the scorer then only renders prompts."""
        assert config.model, "RerankerConfig requires a model for every backend"
        spec = config.model
        location, tokenizer = await load_model_tokenizer(config)
        config = config.model_copy(update={"model": location})
        labels = config.label_alphabet.labels()
        renderer = PromptRenderer(tokenizer, config.chat_template)
        # Labels are checked where the model writes them: right after each rendered prompt.
        token_ids = label_token_ids(tokenizer, labels, renderer.answer_context(config.rank_template))
        answer_ids = label_token_ids(tokenizer, labels,
                                     renderer.answer_context(config.answer_template))
        if answer_ids != token_ids:
            raise RerankerConfigError(
                "the labels tokenize differently after the /answer template's ending than after "
                f"the rank template's ({answer_ids[:3]} against {token_ids[:3]}, first three); "
                "end RANKD_RERANKER_ANSWER_TEMPLATE the way RANKD_RERANKER_RANK_TEMPLATE ends, "
                "or turn RANKD_RERANKER_CHAT_TEMPLATE on")
        pointwise = None
        if config.scoring is Scoring.POINTWISE:
            labels_yn = list(POINTWISE_LABELS)
            pointwise = PointwiseReading(config.pointwise_template, labels_yn, label_token_ids(
                tokenizer, labels_yn, renderer.item_answer_context(config.pointwise_template),
                remedy=POINTWISE_REMEDY))
        if backend is None:
            backend = await start_backend(config, tokenizer, observer)
        if config.max_prompt_tokens:
            limit, setting = config.max_prompt_tokens, "RANKD_RERANKER_MAX_PROMPT_TOKENS"
        else:
            served = backend.context_length
            limit = served if served is not None else await asyncio.to_thread(context_length,
                                                                              location)
            setting = "the model's context length; RANKD_RERANKER_MAX_PROMPT_TOKENS"
        limits = PromptLimits(limit, config.max_item_tokens, config.long_items, setting)
        log.info("reranker ready: backend %s, model %s; %s; %s scoring, %d labels, %d orders",
                 backend.name, config.model, backend.detail, config.scoring, len(labels),
                 config.orders)
        return cls(renderer, backend, labels, token_ids,
                   model=spec,
                   default_orders=config.orders, pointwise=pointwise, limits=limits)

    async def off_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run tokenizer work (``fn(*args)``) on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._tokenizer_thread, functools.partial(fn, *args))

    def check_count(self, count: int, field_name: str = "candidates") -> None:
        if count > self.max_items:
            raise TooManyItemsError(count, self.max_items, field_name)

    def _fit_items(self, task: ListwiseTask) -> ListwiseTask:
        """The task with its items within RANKD_RERANKER_MAX_ITEM_TOKENS, cut or refused."""
        limit = self.limits.max_item_tokens
        if not limit:
            return task
        items = []
        for i, item in enumerate(task.items):
            ids = self.renderer.token_ids(item)
            if len(ids) > limit and self.limits.long_items is LongItems.REFUSE:
                raise ItemTooLongError(len(ids), limit, task.item_field(i))
            items.append(self.renderer.truncate(item, limit, ids) if len(ids) > limit else item)
        return replace(task, items=items)

    def _fitted(self, task: ListwiseTask, render: Callable[[list[str]], RenderedPrompt],
                ) -> tuple[ListwiseTask, dict[int, tuple[int, int]]]:
        """``task`` with its items cut so that ``render(items)`` (one prompt of them) fits the
        prompt limit: each item first to ``task.fit_items_within`` tokens, then, where the
        prompt is still too long, to a fair share of the room the rest of the prompt leaves.
        The share is water-filled: items shorter than it keep their length, and what they
        leave unused is shared among the longer ones. Cuts are reported as index -> (tokens,
        kept tokens). A prompt that no cut can fit (its query alone too long) is refused."""
        cap = task.fit_items_within
        assert cap is not None
        items = [self.renderer.clean_item(item) for item in task.items]
        # Each item is tokenized once: the cuts below decode from its ids.
        encoded = [self.renderer.token_ids(item) for item in items]
        tokens = [len(ids) for ids in encoded]
        limit = self.limits.max_prompt_tokens - 1  # one position for the answer
        kept = [min(t, cap) for t in tokens]
        for _ in range(4):  # tokens can merge at a cut's edges; a pass or two settles it
            cut = [self.renderer.truncate(item, k, ids) if k < t else item
                   for item, ids, t, k in zip(items, encoded, tokens, kept, strict=True)]
            over = len(render(cut).token_ids) - limit
            if over <= 0:
                return replace(task, items=cut), {
                    i: (t, k) for i, (t, k) in enumerate(zip(tokens, kept, strict=True))
                    if k < t}
            room = sum(kept) - over
            if room < len(items):  # not one token per item: the query alone is too long
                raise PromptTooLongError(over + limit + 1 - sum(kept) + len(items),
                                         self.limits.max_prompt_tokens, "query",
                                         self.limits.prompt_setting)
            kept = _water_fill(kept, room)
        raise PromptTooLongError(over + limit + 1, self.limits.max_prompt_tokens,
                                 task.prompt_field, self.limits.prompt_setting)

    def _checked(self, prompt: RenderedPrompt, task: ListwiseTask) -> RenderedPrompt:
        # One position is left for the label the model writes.
        if len(prompt.token_ids) + 1 > self.limits.max_prompt_tokens:
            raise PromptTooLongError(len(prompt.token_ids) + 1, self.limits.max_prompt_tokens,
                                     task.prompt_field, self.limits.prompt_setting)
        return prompt

    def _orders(self, task: ListwiseTask, orders: int,
                ) -> tuple[list[tuple[list[int], RenderedPrompt]], dict[int, tuple[int, int]]]:
        task = self._fit_items(task)
        permutations = order_permutations(len(task.items), orders)
        truncated: dict[int, tuple[int, int]] = {}
        if task.fit_items_within is not None:
            # Every order holds the same items, so one fit serves them all.
            fields, template, labels = task.fields, task.template, self.labels[:len(task.items)]
            task, truncated = self._fitted(task, lambda items: self.renderer.render(
                template, fields, items, labels))
        return [(positions,
                 self._checked(render_order(self.renderer, self.labels, task, positions), task))
                for positions in permutations], truncated

    def _render_all(self, tasks: Sequence[ListwiseTask],
                    ) -> list[tuple[list[tuple[list[int], RenderedPrompt]],
                                    dict[int, tuple[int, int]]]]:
        return [self._orders(task, task.orders or self.default_orders) if task.items
                else ([], {}) for task in tasks]

    def prompts_for(self, items: int, orders: int | None, listwise: bool = False) -> int:
        """How many prompts a rank task of ``items`` reads (``listwise``: an /answer task,
        which never scores pointwise), known before anything is rendered."""
        if not items:
            return 0
        if self.pointwise is not None and not listwise:
            return items
        return len(order_permutations(items, orders or self.default_orders))

    def prompts_needed(self, tasks: Sequence[ListwiseTask], listwise: bool = True) -> int:
        return sum(self.prompts_for(len(task.items), task.orders, listwise) for task in tasks)

    async def _read(self, reads: list[LabelRead]) -> list[list[float]]:
        try:
            logprobs = await self.backend.label_logprobs(reads)
        except BackendError as exc:
            self.last_error, self.last_error_at = f"{exc.reason}: {exc}", time.time()
            raise
        self.last_success_at = time.time()
        self.last_error = None
        return logprobs

    async def rank(self, tasks: Sequence[ListwiseTask]) -> list[ListwiseScores]:
        """Score rank tasks (/rank, /v1/rerank) in the configured scoring mode."""
        self.backend.check_capacity(self.prompts_needed(tasks, listwise=False))
        if self.pointwise is not None:
            return await self.score_items(tasks, self.pointwise)
        return await self.score(tasks)

    async def rank_in_pieces(self, tasks: Sequence[ListwiseTask],
                             max_prompts: int) -> list[ListwiseScores]:
        """``rank`` for bulk callers (training's evaluation, the benches): consecutive pieces of
        the tasks, each of at most ``max_prompts`` prompts (a task larger than that alone), one
        call after another, so that no call asks the backend's queue for more than it holds."""
        results: list[ListwiseScores] = []
        piece: list[ListwiseTask] = []
        prompts = 0
        for task in tasks:
            needed = self.prompts_for(len(task.items), task.orders)
            if piece and prompts + needed > max_prompts:
                results += await self.rank(piece)
                piece, prompts = [], 0
            piece.append(task)
            prompts += needed
        if piece:
            results += await self.rank(piece)
        return results

    async def score_items(self, tasks: Sequence[ListwiseTask],
                          reading: PointwiseReading) -> list[ListwiseScores]:
        """Score every item of every task on its own prompt: its probability of yes against
        no. A task's prompts share their beginning (the instruction and query), which the
        backends compute once."""
        for task in tasks:
            self.check_count(len(task.items))
        rendered = await self.off_loop(self._render_items, tasks, reading.template)
        reads = [LabelRead(prompt.token_ids, reading.token_ids)
                 for prompts, _ in rendered for prompt in prompts]
        if not reads:
            return [ListwiseScores([], [], []) for _ in tasks]
        logprobs = iter(await self._read(reads))
        results = []
        for task, (prompts, truncated) in zip(tasks, rendered, strict=True):
            traces = [OrderTrace(positions=[i], prompt=prompt.text, labels=reading.labels,
                                 label_token_ids=reading.token_ids,
                                 item_ids=[task.item_ids[i] if task.item_ids else str(i)],
                                 probabilities=renormalise(next(logprobs)))
                      for i, prompt in enumerate(prompts)]
            yes = [t.probabilities[0] for t in traces]
            results.append(ListwiseScores(yes, [0.0] * len(yes), traces, consensus=yes,
                                          truncated=truncated))
        return results

    def _render_one(self, template: str, fields: dict[str, str],
                    items: list[str]) -> RenderedPrompt:
        (item,) = items
        return self.renderer.render_item(template, fields, item)

    def _render_items(self, tasks: Sequence[ListwiseTask], template: str,
                      ) -> list[tuple[list[RenderedPrompt], dict[int, tuple[int, int]]]]:
        rendered = []
        for task in tasks:
            task = self._fit_items(task)
            truncated: dict[int, tuple[int, int]] = {}
            if task.fit_items_within is not None:
                # Each item is a prompt of its own: it has that prompt's room to itself.
                items = []
                render = functools.partial(self._render_one, template, task.fields)
                for i, item in enumerate(task.items):
                    alone, cut = self._fitted(replace(task, items=[item]), render)
                    items += alone.items
                    if cut:
                        truncated[i] = cut[0]
                task = replace(task, items=items)
            rendered.append(([self._checked(self.renderer.render_item(template, task.fields,
                                                                      item), task)
                              for item in task.items], truncated))
        return rendered

    async def score(self, tasks: Sequence[ListwiseTask]) -> list[ListwiseScores]:
        """Score every task listwise in its order scheme; all prompts of all tasks go to the
        backend in one call."""
        for task in tasks:
            self.check_count(len(task.items))
        self.backend.check_capacity(self.prompts_needed(tasks))
        rendered = await self.off_loop(self._render_all, tasks)
        reads = [
            LabelRead(prompt.token_ids, self.label_token_ids[: len(task.items)])
            for task, (orders, _) in zip(tasks, rendered, strict=True)
            for _, prompt in orders
        ]
        if not reads:
            return [ListwiseScores([], [], []) for _ in tasks]
        logprobs = await self._read(reads)
        results = []
        cursor = 0
        for task, (task_orders, truncated) in zip(tasks, rendered, strict=True):
            n = len(task.items)
            traces = []
            for positions, prompt in task_orders:
                probabilities = renormalise(logprobs[cursor])
                cursor += 1
                traces.append(OrderTrace(
                    positions=list(positions),
                    prompt=prompt.text,
                    labels=self.labels[:n],
                    label_token_ids=self.label_token_ids[:n],
                    item_ids=[task.item_ids[p] if task.item_ids else str(p) for p in positions],
                    probabilities=probabilities,
                ))
            permutations = [t.positions for t in traces]
            per_order = [t.probabilities for t in traces]
            means, spreads, least, agreement = order_evidence(n, permutations, per_order)
            results.append(ListwiseScores(means, spreads, traces, least, agreement, truncated))
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
        self._tokenizer_thread.shutdown(wait=True)
