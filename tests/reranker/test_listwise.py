"""ListwiseScorer.score with the transformers backend on the tiny LM, checked by hand."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reranker import LabelAlphabet, ListwiseScores, TooManyItemsError
from reranker.backends.transformers_backend import TransformersBackend
from retriever.catalog import CatalogEntry
from tests.reranker.conftest import make_task, open_scorer

# Both sides run the same float32 weights on the same CPU; what differs is batching and left
# padding (other matmul shapes and summation orders). With logits up to |8| that moves label
# probabilities by ~1e-6 (measured 0.9e-6); 1e-5 is ten times that and far below the ~1e-3 gaps
# between labels that a wrong mapping would produce.
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def reference(tiny_lm: Path) -> tuple[Any, Any]:
    """The tiny LM loaded directly, for the test's own forward passes."""
    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_lm)


def by_hand(reference: tuple[Any, Any], prompt: str, labels: list[str]) -> list[float]:
    """One unpadded forward pass; log-softmax over the label logits in float64, by hand."""
    model, tokenizer = reference
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
    label_logits = [float(logits[tokenizer.convert_tokens_to_ids(label)]) for label in labels]
    top = max(label_logits)
    log_total = top + math.log(sum(math.exp(z - top) for z in label_logits))
    return [math.exp(z - log_total) for z in label_logits]


def by_id(scores: ListwiseScores, ids: list[str]) -> dict[str, float]:
    return dict(zip(ids, scores.probabilities, strict=True))


async def test_each_order_is_a_distribution_over_its_labels(tiny_lm: Path,
                                                            catalogue: list[CatalogEntry]) -> None:
    task = make_task(catalogue[:25], "1/2 + 1/3 = 2/5")
    async with open_scorer("transformers", model=str(tiny_lm)) as scorer:
        (scores,) = await scorer.score([task])
    assert len(scores.orders) == 2
    for order in scores.orders:
        assert order.labels == LabelAlphabet.UPPER.labels()[:25]
        assert math.isclose(sum(order.probabilities), 1.0, abs_tol=1e-9)
        assert all(0.0 < p < 1.0 for p in order.probabilities)
    assert math.isclose(sum(scores.probabilities), 1.0, abs_tol=1e-9)


async def test_scores_match_an_independent_forward_pass_averaged_over_both_orders(
        tiny_lm: Path, catalogue: list[CatalogEntry], reference: tuple[Any, Any]) -> None:
    entries = catalogue[3:15]
    task = make_task(entries, "Simplify 6/8. Incorrect answer: 3/8")
    async with open_scorer("transformers", model=str(tiny_lm)) as scorer:
        (scores,) = await scorer.score([task])
    labels = LabelAlphabet.UPPER.labels()[: len(entries)]
    forward, reverse = scores.orders
    assert forward.item_ids == [e.id for e in entries]
    assert reverse.item_ids == [e.id for e in reversed(entries)]

    expected: dict[str, list[float]] = {e.id: [] for e in entries}
    for order in scores.orders:
        hand = by_hand(reference, order.prompt, labels)
        assert max(abs(a - b) for a, b in zip(hand, order.probabilities, strict=True)) < TOLERANCE
        for item_id, probability in zip(order.item_ids, hand, strict=True):
            expected[item_id].append(probability)
    averaged = {item_id: sum(ps) / 2 for item_id, ps in expected.items()}
    got = by_id(scores, task.item_ids)
    assert max(abs(averaged[i] - got[i]) for i in averaged) < TOLERANCE
    # The two orders disagree (position bias), so the averaging is doing real work.
    assert max(abs(ps[0] - ps[1]) for ps in expected.values()) > 1e-3


async def test_a_reversed_list_maps_labels_back_to_the_same_items(
        tiny_lm: Path, catalogue: list[CatalogEntry]) -> None:
    entries = catalogue[20:30]
    task = make_task(entries, "Area of a triangle with base 4 and height 3. Incorrect answer: 12")
    flipped = make_task(entries[::-1], task.fields["query"])
    async with open_scorer("transformers", model=str(tiny_lm)) as scorer:
        scores, flipped_scores = await scorer.score([task, flipped])
    # The reversed list's forward prompt is the original's reverse prompt, label for label.
    assert flipped_scores.orders[0].prompt == scores.orders[1].prompt
    assert flipped_scores.orders[0].item_ids == scores.orders[1].item_ids
    original, reversed_ = by_id(scores, task.item_ids), by_id(flipped_scores, flipped.item_ids)
    assert original.keys() == reversed_.keys()
    assert max(abs(original[i] - reversed_[i]) for i in original) < TOLERANCE
    # And the scores are not trivially equal across items.
    assert max(original.values()) - min(original.values()) > 1e-3


async def test_batched_prompts_of_different_lengths_match_one_at_a_time(
        tiny_lm: Path, catalogue: list[CatalogEntry]) -> None:
    tasks = [make_task(catalogue[:3], "short"),
             make_task(catalogue[10:35], "a much longer query " * 8),
             make_task(catalogue[40:47], "Order the decimals 0.5, 0.45 and 0.405")]
    # A token cap that holds all six prompts, so that they share one pass.
    async with open_scorer("transformers", model=str(tiny_lm), batch_tokens=8192) as scorer:
        backend = scorer.backend
        assert isinstance(backend, TransformersBackend)
        before = backend.batches
        together = await scorer.score(tasks)
        assert backend.batches - before == 1  # six prompts, one micro-batch
        alone = [(await scorer.score([task]))[0] for task in tasks]
    for a, b in zip(together, alone, strict=True):
        for order_a, order_b in zip(a.orders, b.orders, strict=True):
            diffs = [abs(x - y) for x, y in zip(order_a.probabilities, order_b.probabilities,
                                                strict=True)]
            assert max(diffs) < TOLERANCE


async def test_concurrent_callers_share_forward_passes(tiny_lm: Path,
                                                       catalogue: list[CatalogEntry]) -> None:
    tasks = [make_task(catalogue[i:i + 8], f"query number {i}") for i in range(8)]
    # A token cap that holds every caller's prompts, so that only the batcher decides.
    async with open_scorer("transformers", model=str(tiny_lm), batch_tokens=8192) as scorer:
        backend = scorer.backend
        assert isinstance(backend, TransformersBackend)
        before = backend.batches
        results = await asyncio.gather(*(scorer.score([task]) for task in tasks))
        passes = backend.batches - before
    assert len(results) == 8
    assert 1 <= passes < len(tasks)  # 16 prompts from 8 callers in fewer passes than callers


async def test_more_items_than_labels_is_refused(tiny_lm: Path,
                                                 catalogue: list[CatalogEntry]) -> None:
    async with open_scorer("transformers", model=str(tiny_lm)) as scorer:
        assert scorer.max_items == 26
        with pytest.raises(TooManyItemsError) as caught:
            await scorer.score([make_task(catalogue[:27], "too many")])
        assert caught.value.limit == 26
        assert await scorer.score([make_task([], "nothing")]) == [ListwiseScores([], [], [])]
    async with open_scorer("transformers", model=str(tiny_lm),
                           label_alphabet=LabelAlphabet.UPPER_LOWER) as scorer:
        (scores,) = await scorer.score([make_task(catalogue[:40], "forty items")])
        assert scorer.max_items == 52
        assert scores.orders[0].labels[25:28] == ["Z", "a", "b"]
        assert math.isclose(sum(scores.orders[1].probabilities), 1.0, abs_tol=1e-9)
