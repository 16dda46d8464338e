"""POST /v1/rerank (and /rerank, /v2/rerank): the Cohere/Jina-compatible endpoint."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from reranker.windows import balanced_windows, merge_window_scores
from tests.support.apps import app_client, serve_in_thread

DOCUMENTS = [
    "Believes the product of two negative numbers is negative",
    "Confuses the radius and the diameter of a circle",
    "Thinks subtracting a negative number makes the answer smaller",
    "Believes 1 is a prime number",
]


@pytest.fixture
def rerank_settings(settings_factory: Any, tiny_lm: Path) -> Any:
    return settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))


async def test_rerank_matches_rank_scores_for_the_same_items(rerank_settings: Any) -> None:
    query = "Work out -4 x -3. Incorrect answer: -12"
    async with app_client(rerank_settings) as (_, client):
        response = await client.post("/v1/rerank", json={
            "model": "ignored", "query": query, "documents": [DOCUMENTS[0], {"text": DOCUMENTS[1]},
                                                             *DOCUMENTS[2:]],
            "return_documents": True})
        aliases = [await client.post(path, json={"query": query, "documents": DOCUMENTS})
                   for path in ("/rerank", "/v2/rerank")]
    assert response.status_code == 200
    body = response.json()
    assert body["id"]
    assert body["model"] == str(rerank_settings.reranker.model)
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3]
    assert sum(scores) == pytest.approx(1.0)  # one window: the averaged label probabilities
    for result in body["results"]:
        assert result["document"]["text"] == DOCUMENTS[result["index"]]
    for alias in aliases:
        assert alias.status_code == 200
        assert [r["index"] for r in alias.json()["results"]] == [r["index"] for r in body["results"]]
        assert "document" not in alias.json()["results"][0]


async def test_more_documents_than_labels_are_ranked_in_windows(rerank_settings: Any) -> None:
    documents = [f"Misconception number {i} about fractions and decimals" for i in range(60)]
    async with app_client(rerank_settings) as (app, client):
        response = await client.post("/v1/rerank", json={"query": "fractions",
                                                         "documents": documents, "top_n": 10})
        scorer = app.state.engine.scorer
        windows = balanced_windows(len(documents), scorer.max_items)
        from reranker import ListwiseTask

        direct = await scorer.score([
            ListwiseTask(rerank_settings.reranker.rank_template,
                         {"instruction": rerank_settings.reranker.instruction, "query": "fractions"},
                         [documents[i] for i in w]) for w in windows])
    assert [len(w) for w in windows] == [20, 20, 20]
    body = response.json()
    assert body["usage"]["windows"] == 3
    assert len(body["results"]) == 10
    expected = merge_window_scores(windows, [s.probabilities for s in direct])
    top = sorted(range(60), key=lambda i: -expected[i])[:10]
    assert [r["index"] for r in body["results"]] == top
    for result in body["results"]:
        assert result["relevance_score"] == pytest.approx(expected[result["index"]], abs=1e-9)


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"query": "q", "documents": []}, 422, "documents"),
    ({"query": " ", "documents": ["a"]}, 422, "query"),
    ({"query": "q", "documents": ["a", 5]}, 422, "documents[1]"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ({"query": "q", "documents": ["a"] * 1001}, 422, "documents"),
    ({"documents": ["a"]}, 422, "query"),
])
async def test_bad_rerank_input(rerank_settings: Any, body: dict[str, Any], status: int,
                                field: str) -> None:
    async with app_client(rerank_settings) as (_, client):
        response = await client.post("/v1/rerank", json=body)
    assert response.status_code == status
    assert response.json()["error"]["field"].startswith(field)


async def test_refuse_keeps_the_character_limit(settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_long_items="refuse")
    async with app_client(settings) as (_, client):
        response = await client.post("/v1/rerank", json={"query": "q",
                                                         "documents": ["a", "x" * 20001]})
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["field"] == "documents[1]"
    assert "RANKD_MAX_DOCUMENT_CHARS" in error["message"]


async def test_a_document_of_any_length_is_cut_not_refused(rerank_settings: Any) -> None:
    """Past RANKD_MAX_DOCUMENT_CHARS and far past the model: cut in characters before it is
    tokenized (the tokenizer's work bounded), then in tokens, and reported."""
    long = "负数乘以负数得正数。" * 12000  # 120,000 characters
    async with app_client(rerank_settings) as (_, client):
        response = await client.post("/v1/rerank", json={
            "query": "negative numbers", "documents": [DOCUMENTS[0], long, DOCUMENTS[1]],
            "return_documents": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2]
    (cut,) = body["meta"]["truncated_documents"]
    assert cut["index"] == 1
    assert cut["characters"] == len(long)
    assert cut["kept_tokens"] < cut["tokens"]
    assert "1 document(s) were cut to fit" in body["meta"]["warnings"][0]
    assert body["usage"]["truncated_documents"] == 1
    # The document comes back whole: only what the model read was cut.
    assert next(r for r in body["results"] if r["index"] == 1)["document"]["text"] == long


async def test_without_a_reranker_the_endpoint_is_503(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/v1/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert response.status_code == 503
    assert "RANKD_RERANKER_BACKEND=none" in response.json()["error"]["message"]


def test_the_cohere_sdk_talks_to_rankd(settings_factory: Any, tiny_lm: Path) -> None:
    import cohere

    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                api_key="sdk-key")
    with serve_in_thread(settings) as url:
        v2 = cohere.ClientV2(api_key="sdk-key", base_url=url, timeout=60)
        response = v2.rerank(model="rankd", query="negative numbers", documents=DOCUMENTS,
                             top_n=3)
        v1 = cohere.Client(api_key="sdk-key", base_url=url, timeout=60)
        legacy = v1.rerank(model="rankd", query="negative numbers", documents=DOCUMENTS,
                           return_documents=True)
        wrong = cohere.ClientV2(api_key="wrong", base_url=url, timeout=60)
        with pytest.raises(Exception, match=r"401|nauthori"):
            wrong.rerank(model="rankd", query="q", documents=["a"])
    assert len(response.results) == 3
    assert {r.index for r in response.results} <= set(range(4))
    scores = [r.relevance_score for r in legacy.results]
    assert scores == sorted(scores, reverse=True)
    assert legacy.results[0].document.text == DOCUMENTS[legacy.results[0].index]


def test_the_cohere_sdk_gets_pages_over_the_character_limit_ranked(
        settings_factory: Any, tiny_lm: Path) -> None:
    """Six pages of about 6,300 words (39,489 characters each), as a RAG pipeline sends them:
    ranked and told what was cut, with and without max_tokens_per_doc."""
    import cohere

    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    words = ["negative", "numbers", "multiplied", "give", "a", "positive", "product", "and"]
    pages = [f"Page {i}: " + " ".join(words[j % len(words)] for j in range(6300))
             for i in range(6)]
    pages = [page[:39489] for page in pages]
    assert all(len(page) == 39489 > settings.max_document_chars for page in pages)
    with serve_in_thread(settings) as url:
        client = cohere.ClientV2(base_url=url, api_key="none", timeout=120)
        fitted = client.rerank(model="rankd", query="negative numbers", documents=pages)
        capped = client.rerank(model="rankd", query="negative numbers", documents=pages,
                               max_tokens_per_doc=256)
    for answer, per_doc in ((fitted, 4096), (capped, 256)):
        assert sorted(r.index for r in answer.results) == list(range(6))
        assert answer.meta is not None
        assert answer.meta.warnings
        assert answer.meta.warnings[-1].startswith("6 document(s) were cut to fit")
        assert f"max_tokens_per_doc {per_doc}" in answer.meta.warnings[-1]


def test_the_cohere_sdk_gets_long_documents_ranked_and_told_what_was_cut(
        settings_factory: Any, tiny_lm: Path) -> None:
    """A RAG pipeline's pages, longer together than the model reads: Cohere cuts them, and so
    does rankd, with and without the SDK's max_tokens_per_doc."""
    import cohere

    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_max_prompt_tokens=512)
    pages = [f"Page {i}: " + "negative numbers multiplied give a positive product " * 60
             for i in range(5)]
    with serve_in_thread(settings) as url:
        client = cohere.ClientV2(base_url=url, api_key="none", timeout=60)
        fitted = client.rerank(model="rankd", query="negative numbers", documents=pages)
        capped = client.rerank(model="rankd", query="negative numbers", documents=pages,
                               max_tokens_per_doc=16, top_n=2)
    assert sorted(r.index for r in fitted.results) == list(range(5))
    assert fitted.meta is not None
    assert fitted.meta.warnings
    assert fitted.meta.warnings[0].startswith("5 document(s) were cut to fit")
    assert "max_tokens_per_doc 4096" in fitted.meta.warnings[0]
    assert len(capped.results) == 2
    assert capped.meta is not None
    assert capped.meta.warnings
    assert "max_tokens_per_doc 16" in capped.meta.warnings[0]
    assert "-> 16" in capped.meta.warnings[0]


async def test_concurrent_rerank_requests(rerank_settings: Any) -> None:
    async with app_client(rerank_settings) as (_, client):
        responses = await asyncio.gather(*(client.post("/v1/rerank", json={
            "query": f"query {i}", "documents": DOCUMENTS}) for i in range(8)))
    assert all(r.status_code == 200 for r in responses)
