"""Prefix sharing in the transformers backend: each shared prefix runs once, every prompt's own
suffix runs over its cached keys and values, and the scores equal the unshared path's."""

from __future__ import annotations

from pathlib import Path

import pytest

from reranker import ListwiseScorer, ListwiseTask
from reranker.backends.base import LabelRead
from reranker.backends.transformers_backend import (
    MIN_SHARED_TOKENS,
    TransformersBackend,
    shared_prefix_groups,
)
from retriever.catalog import CatalogEntry
from tests.reranker.conftest import make_task, open_scorer

TOLERANCE = 1e-5


def test_groups_are_runs_of_a_common_prefix() -> None:
    head = list(range(100, 100 + MIN_SHARED_TOKENS))
    prompts = [[*head, 1, 2, 3], [7, 7, 7], [*head, 1, 9], [*head, 4], [7, 7, 8]]
    groups = shared_prefix_groups(prompts)
    by_members = {tuple(sorted(m)): length for length, m in groups}
    assert by_members[(0, 2, 3)] == MIN_SHARED_TOKENS  # the three share `head` alone
    # Short common beginnings are not groups: each of these runs alone, all but its last token
    # in the prefix pass.
    assert by_members[(1,)] == 2
    assert by_members[(4,)] == 2
    # A prompt that is a prefix of another keeps its last token for the suffix pass.
    longer = [*head, 1, 2, 3]
    (length, _), = shared_prefix_groups([longer, [*longer, 5, 6]])
    assert length == len(longer) - 1


def test_two_queries_in_one_batch_keep_their_own_prefixes() -> None:
    # Pointwise prompts of two queries: the instruction alone is common to all six, each
    # query's own text to its three. One group of six sharing the instruction would run both
    # queries' text six times; two groups run each once.
    instruction = list(range(100, 100 + MIN_SHARED_TOKENS))
    first = [*instruction, *range(500, 540)]
    second = [*instruction, *range(600, 640)]
    prompts = [[*first, 1, 2], [*first, 3], [*first, 4, 5], [*second, 6], [*second, 7, 8],
               [*second, 9]]
    groups = {tuple(sorted(m)): length for length, m in shared_prefix_groups(prompts)}
    assert groups == {(0, 1, 2): len(first), (3, 4, 5): len(second)}


def _tasks(catalogue: list[CatalogEntry]) -> list[ListwiseTask]:
    query = "Calculate 1/2 + 1/3. Incorrect answer: 2/5"
    tasks = [make_task(catalogue[:10], query),  # the default two orders
             make_task(catalogue[5:9], "short"),
             make_task(catalogue[20:45], "a much longer query " * 6)]
    return [*tasks,
            ListwiseTask(tasks[0].template, tasks[0].fields, tasks[0].items, tasks[0].item_ids,
                         orders=4),
            ListwiseTask(tasks[1].template, tasks[1].fields, tasks[1].items, tasks[1].item_ids,
                         orders=1)]


async def _scores(model: Path, tasks: list[ListwiseTask], sharing: bool
                  ) -> tuple[list[list[float]], int]:
    async with open_scorer("transformers", model=str(model), prefix_sharing=sharing,
                           batch_wait_ms=50, batch_tokens=65536, timeout_s=600) as scorer:
        backend = scorer.backend
        assert isinstance(backend, TransformersBackend)
        before = backend.batches
        scored = await scorer.score(tasks)
        batches = backend.batches - before
    return [o.probabilities for s in scored for o in s.orders], batches


async def _check_equal(model: Path, catalogue: list[CatalogEntry]) -> None:
    tasks = _tasks(catalogue)
    shared, shared_batches = await _scores(model, tasks, True)
    plain, plain_batches = await _scores(model, tasks, False)
    assert shared_batches == plain_batches == 1  # one micro-batch: 2 + 2 + 2 + 4 + 1 prompts
    assert len(shared) == 11
    for a, b in zip(shared, plain, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE


async def test_shared_scores_equal_unshared_on_the_tiny_lm(
        tiny_lm: Path, catalogue: list[CatalogEntry]) -> None:
    await _check_equal(tiny_lm, catalogue)


@pytest.mark.slow
async def test_shared_scores_equal_unshared_on_smollm2(
        smollm2: Path, catalogue: list[CatalogEntry]) -> None:
    await _check_equal(smollm2, catalogue)


async def test_label_logprobs_equal_for_reads_with_nothing_shared(tiny_lm: Path) -> None:
    reads = [LabelRead([5, 6, 7, 8], [10, 11]), LabelRead([9, 3], [10, 11, 12]),
             LabelRead([4], [13, 14])]
    results = []
    for sharing in (True, False):
        async with open_scorer("transformers", model=str(tiny_lm), batch_tokens=8192,
                               prefix_sharing=sharing) as scorer:
            backend = scorer.backend
            assert isinstance(backend, TransformersBackend)
            results.append(await backend.label_logprobs(reads))
    for a, b in zip(*results, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE


async def test_sharing_runs_only_where_it_saves_enough(tiny_lm: Path,
                                                      catalogue: list[CatalogEntry]) -> None:
    short = make_task(catalogue[:4], "Calculate 1/2 + 1/3. Incorrect answer: 2/5")
    # 26 long items after a short query: the shared part is a small share of each prompt.
    long_items = [f"{e.text}. " * 6 for e in catalogue[:26]]
    long = ListwiseTask(short.template, {"instruction": "Pick.", "query": "q"}, long_items)
    # A cap that holds both long prompts (the tiny model's attention span is about 640 tokens,
    # so a long prompt's pass costs several times its length).
    async with open_scorer("transformers", model=str(tiny_lm), batch_wait_ms=50,
                           batch_tokens=65536) as scorer:
        backend = scorer.backend
        assert isinstance(backend, TransformersBackend)
        before = backend.forward_passes
        await scorer.score([short])
        assert backend.forward_passes - before == 2  # prefix pass, suffix pass
        before = backend.forward_passes
        await scorer.score([long])
        assert backend.forward_passes - before == 1  # not worth it: one ordinary pass
        before = backend.forward_passes
        await scorer.score([ListwiseTask(short.template, short.fields, short.items, orders=1)])
        assert backend.forward_passes - before == 1  # nothing to share
        before = backend.forward_passes
        mixed = await scorer.score([short, long])
        assert backend.forward_passes - before == 3  # the long pair whole, the short pair shared
    async with open_scorer("transformers", model=str(tiny_lm), prefix_sharing=False,
                           batch_wait_ms=50, batch_tokens=65536) as scorer:
        plain = await scorer.score([short, long])
    for a, b in zip(mixed, plain, strict=True):
        assert max(abs(x - y) for x, y in zip(a.probabilities, b.probabilities,
                                              strict=True)) < TOLERANCE


def test_scorer_type_is_the_one_label_logprob_path() -> None:
    assert ListwiseScorer.score.__qualname__ == "ListwiseScorer.score"


def test_the_padding_bench_counts_a_shared_prefix_once_and_pads_the_suffixes() -> None:
    from bench.padding import pass_tokens

    prefix = list(range(100, 120))
    reads = [LabelRead([*prefix, *range(n * 10, n * 11)], [1, 2]) for n in (2, 4, 6)]
    assert pass_tokens(reads) == (20 + 2 + 4 + 6, 20 + 3 * 6)
    # Nothing shared: whole prompts, left-padded to the longest.
    alone = [LabelRead([5, 6, 7, 8], [1]), LabelRead([9, 3], [1])]
    assert pass_tokens(alone) == (6, 8)
