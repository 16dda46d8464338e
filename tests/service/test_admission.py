"""Admission by predicted cost: a request whose work would take the reranker longer alone than
its budget (RANKD_RERANKER_TIMEOUT_S), at the rate the batcher measured, never holds the model.
A /v1/rerank that left max_tokens_per_doc to the service is cut further to fit, with a
warning; one whose client chose the cut is refused at once with a 422 naming the estimate and
the budget. With the tiny LM, then with the real SmolLM2 beside a normal /rank."""

from __future__ import annotations

import asyncio
import math
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.apps import app_client

BUDGET_S = 0.5
WORDS = ["the", "product", "of", "two", "negative", "numbers", "is", "positive", "because"]


def _document(tokens: int, seed: int) -> str:
    return f"Page {seed}: " + " ".join(WORDS[(seed + i) % len(WORDS)] for i in range(tokens))


async def _warm(client: Any) -> None:
    for _ in range(3):  # the batcher measures its rate on what it runs
        response = await client.post("/v1/rerank", json={"query": "negative numbers",
                                                         "documents": [_document(40, 1),
                                                                       _document(40, 2)]})
        assert response.status_code == 200, response.text


async def test_over_budget_is_refused_or_cut_before_it_runs(settings_factory: Any,
                                                             tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_scoring="pointwise", reranker_timeout_s=BUDGET_S,
                                max_rerank_documents=1000)
    async with app_client(settings) as (app, client):
        await _warm(client)
        backend = app.state.engine.scorer.backend
        rate = backend._batcher.rate
        assert rate > 0
        # Enough documents that their work, at the measured rate, is three budgets.
        per_doc = 400
        count = min(1000, math.ceil(3 * BUDGET_S * rate / per_doc))
        documents = [_document(per_doc, i) for i in range(count)]
        passes = backend.forward_passes
        started = time.perf_counter()
        refused = await client.post("/v1/rerank", json={
            "query": "negative numbers", "documents": documents, "max_tokens_per_doc": 4096})
        refused_s = time.perf_counter() - started
        assert backend.forward_passes == passes  # it never reached the model
        started = time.perf_counter()
        cut = await client.post("/v1/rerank", json={"query": "negative numbers",
                                                    "documents": documents})
        cut_s = time.perf_counter() - started
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "limit_exceeded"
    assert error["field"] == "documents"
    assert f"over its budget of {BUDGET_S:g} s (RANKD_RERANKER_TIMEOUT_S)" in error["message"]
    assert "max_tokens_per_doc" in error["message"]
    assert refused_s < 1.0 + count * 0.002  # rendering the prompts only
    assert cut.status_code == 200, cut.text
    body = cut.json()
    assert len(body["results"]) == count
    (budget, *_) = body["meta"]["warnings"]
    assert budget.startswith("the documents were cut further, to at most")
    assert f"budget of {BUDGET_S:g} s" in budget
    print(f"\nrate {rate:.0f} work/s, {count} documents: refused in {refused_s:.2f} s, cut "
          f"to fit in {cut_s:.2f} s")


@pytest.mark.slow
async def test_the_real_model_answers_far_past_budget_requests_quickly(
        settings_factory: Any, smollm2: Path) -> None:
    """Twelve documents of 19,992 CJK characters each, far past SmolLM2's context: refused at
    once when the client set max_tokens_per_doc, else cut to the budget and answered within
    it; normal /ranks beside the cut one stay near their solo time.

    What a /rank beside it can wait for, by design: the pass in flight (passes are not
    preempted), and once the big request has waited past its own solo time, its next pass
    (docs/reliability.md). On 2 AVX2 cores in float32 one pass is as long as the whole /rank's
    rerank, so a /rank sent the instant one starts takes 2x, and one that also meets the big
    request overdue 3x. The /ranks come as users' do, after pauses of their own, so they land
    at varied points of the passes; in eight runs here their median was 1.5x to 2.3x, and the
    slowest 3.0x. The bounds below hold by that design, with room for a noisy host: a request
    that held the model would keep the /ranks beside it waiting for the whole of its 5 to 9 s."""
    budget = 12.0
    pauses = [0.6, 0.2, 0.9, 0.4]  # seconds, so the arrivals fall at varied points of a pass
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(smollm2),
                                reranker_timeout_s=budget)
    documents = ["负数乘以负数得正数，" * 1999 + "正数。"[: 19992 - 10 * 1999]
                 for _ in range(12)]
    assert {len(d) for d in documents} == {19992}
    rank = {"query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "candidates": 10}

    async def timed_rank(client: Any) -> float:
        started = time.perf_counter()
        response = await client.post("/rank", json=rank)
        assert response.status_code == 200, response.text
        assert response.json()["reranked"] is True
        return time.perf_counter() - started

    async with app_client(settings) as (_, client):
        await timed_rank(client)  # warm-up, and the rate
        alone = statistics.median([await timed_rank(client) for _ in range(3)])
        started = time.perf_counter()
        refused = await client.post("/v1/rerank", json={
            "query": "negative numbers", "documents": documents, "max_tokens_per_doc": 8192})
        refused_s = time.perf_counter() - started
        cut_started = time.perf_counter()
        cut_task = asyncio.create_task(client.post("/v1/rerank", json={
            "query": "negative numbers", "documents": documents}))
        beside = []
        while not cut_task.done():
            await asyncio.sleep(pauses[len(beside) % len(pauses)])
            if not cut_task.done():
                beside.append(await timed_rank(client))
        cut = await cut_task
        cut_s = time.perf_counter() - cut_started
    assert refused.status_code == 422, refused.text
    assert "RANKD_RERANKER_TIMEOUT_S" in refused.json()["error"]["message"]
    assert refused_s < 1.5  # tokenizing 240,000 characters once, and no forward pass
    assert cut.status_code == 200, cut.text
    assert cut.json()["meta"]["warnings"][0].startswith("the documents were cut further")
    print(f"\n/rank alone {alone:.2f} s, beside the cut request {statistics.median(beside):.2f} "
          f"s ({', '.join(f'{b:.2f}' for b in beside)}); refused in {refused_s:.2f} s; the cut one "
          f"answered in {cut_s:.2f} s")
    assert len(beside) >= 2
    assert statistics.median(beside) <= 3 * alone
    assert max(beside) <= 4 * alone
