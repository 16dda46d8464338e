"""Training examples: serving's prompts over the retriever's candidates, and their loss.

Each example is rendered by serving's renderer with the configured template, instruction,
labels and scoring mode, and the loss is over the label distribution that serving reads
(``last_logits`` then ``label_log_softmax`` of ``TransformersBackend``, prefix sharing
included):

- listwise: the cross-entropy of the positive's label among the N labels, for each order the
  example is shown in;
- pointwise: each candidate's own prompt gives the score log P(yes) - log P(no), and the loss is
  the cross-entropy of the positive among the query's N candidates (a listwise loss over
  pointwise scores, as cross-encoders are trained).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reranker.backends.base import LabelRead
from reranker.backends.transformers_backend import TransformersBackend, label_log_softmax
from reranker.config import POINTWISE_LABELS, RerankerConfig, Scoring
from reranker.labels import POINTWISE_REMEDY, label_token_ids
from reranker.listwise import ListwiseScorer, ListwiseTask, PointwiseReading
from reranker.prompt import PromptRenderer
from reranker.ranking import rank_task
from reranker.training.config import (
    CandidateOrder,
    ExampleOrders,
    MissingPositive,
    RerankerTrainingConfig,
    RerankerTrainingError,
)

if TYPE_CHECKING:
    from retriever.pairs import TrainingPair
    from retriever.vocabulary import Hit

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
    random_negatives: int = 0  # catalogue entries drawn in place of retrieved negatives
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
                "random_negatives": self.random_negatives,
                "skipped_missing_positive": self.skipped_missing_positive,
                "skipped_too_long": self.skipped_too_long, "examples": self.examples,
                "prompts": self.prompts, "prompt_tokens_median": tokens[len(tokens) // 2],
                "prompt_tokens_max": tokens[-1]}


def build_examples(pairs: Sequence[TrainingPair], hits: Sequence[Sequence[Hit]],
                   entries: dict[str, Hit], builder: PromptBuilder,
                   config: RerankerTrainingConfig) -> tuple[list[Example], ExampleStats]:
    """One example per pair from its top-N candidates (N fixed, or drawn per example), the
    positive put in the last place when the retriever missed it, the last retrieved negatives
    replaced by random catalogue entries when asked, in the configured order."""
    rng = random.Random(config.seed)
    draw = random.Random(config.seed + 1)  # the random negatives; the orders keep their draws
    catalogue = sorted(entries)
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
        if config.random_negatives:
            top = _with_random_negatives(top, pair.positive_id, config.random_negatives,
                                         catalogue, entries, draw)
            stats.random_negatives += config.random_negatives
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


def _with_random_negatives(top: list[Hit], positive_id: str, count: int,
                           catalogue: list[str], entries: dict[str, Hit],
                           rng: random.Random) -> list[Hit]:
    """``top`` with its last ``count`` negatives replaced by entries drawn from the catalogue
    that are not among its candidates; the positive and the others keep their places."""
    taken = {h.id for h in top}
    slots = [i for i, h in enumerate(top) if h.id != positive_id][-count:]
    if len(set(catalogue) - taken) < len(slots):
        raise RerankerTrainingError(f"--random-negatives {count}: the catalogue has too few "
                                    "entries outside the candidates to draw from")
    mixed = list(top)
    for slot in slots:
        while (entry := catalogue[rng.randrange(len(catalogue))]) in taken:
            pass
        taken.add(entry)
        mixed[slot] = entries[entry]
    return mixed


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

