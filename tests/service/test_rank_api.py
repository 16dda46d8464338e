"""POST /rank end to end through the real app: real MiniLM, real FAISS, lifespan run."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever import Embedder, build_collection
from retriever.data import sample_entries, sample_queries_path
from tests.support.apps import app_client, metric_value


def _sample_queries() -> list[dict[str, Any]]:
    return [json.loads(line) for line in sample_queries_path().read_text().splitlines()]


async def test_rank_returns_retrieval_order_without_reranker(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/rank", json={"query": "What is 7 to the power 0? I said 0",
                                                     "top_k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["collection"] == "misconceptions"
    assert body["reranked"] is False
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    assert all(r["score"] == r["retrieval_score"] for r in body["results"])
    assert all(isinstance(r["id"], str) for r in body["results"])
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    assert body["results"][0]["id"] == "21"  # "any number to the power of zero is zero"
    assert body["timings_ms"]["rerank"] is None
    assert body["timings_ms"]["total"] >= body["timings_ms"]["retrieve"] > 0
    assert "no reranker is configured" in body["warnings"][0]


async def test_top_k_matches_an_independent_numpy_reference(settings_factory: Any,
                                                            embedder: Embedder) -> None:
    entries = sample_entries()
    doc = embedder.model.encode([e.text for e in entries], convert_to_numpy=True)
    doc /= np.linalg.norm(doc, axis=1, keepdims=True)
    queries = [q["query"] for q in _sample_queries()]
    q = embedder.model.encode(queries, convert_to_numpy=True)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    expected = np.argsort(-(q @ doc.T), axis=1, kind="stable")[:, :10]
    async with app_client(settings_factory()) as (_, client):
        for row, text in enumerate(queries):
            body = (await client.post("/rank", json={"query": text, "top_k": 10})).json()
            assert [r["id"] for r in body["results"]] == [entries[i].id for i in expected[row]]


async def test_batch_endpoint_answers_in_order(settings_factory: Any) -> None:
    queries = _sample_queries()[:6]
    async with app_client(settings_factory()) as (_, client):
        batch = await client.post("/rank/batch", json={"queries": [
            {"query": q["query"], "top_k": 3 + i} for i, q in enumerate(queries)]})
        singles = [(await client.post("/rank", json={"query": q["query"], "top_k": 3 + i})).json()
                   for i, q in enumerate(queries)]
    assert batch.status_code == 200
    answers = batch.json()
    assert [len(a["results"]) for a in answers] == [3, 4, 5, 6, 7, 8]
    assert [[r["id"] for r in a["results"]] for a in answers] == \
        [[r["id"] for r in s["results"]] for s in singles]


async def test_fifty_concurrent_requests_share_encoder_batches(settings_factory: Any) -> None:
    queries = [q["query"] for q in _sample_queries()]
    texts = [queries[i % len(queries)] for i in range(50)]
    async with app_client(settings_factory(embedder_batch_wait_ms=5)) as (_, client):
        expected = {t: [r["id"] for r in (await client.post(
            "/rank", json={"query": t, "top_k": 5})).json()["results"]] for t in set(texts)}
        before = metric_value((await client.get("/metrics")).text, "rankd_batch_size_count",
                              stage="search")
        responses = await asyncio.gather(*(client.post("/rank", json={"query": t, "top_k": 5})
                                           for t in texts))
        metrics = (await client.get("/metrics")).text
    assert all(r.status_code == 200 for r in responses)
    for text, response in zip(texts, responses, strict=True):
        assert [r["id"] for r in response.json()["results"]] == expected[text]
    batches = metric_value(metrics, "rankd_batch_size_count", stage="search") - before
    assert 1 <= batches < 50
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="200") == 50 + len(expected)


BAD_INPUTS = [
    ({"query": ""}, 422, "query", "empty"),
    ({"query": "   \n\t"}, 422, "query", "empty"),
    ({"query": "x" * 4001}, 422, "query", "4000"),
    ({"query": "q", "top_k": 0}, 422, "top_k", "greater than or equal to 1"),
    ({"query": "q", "top_k": 101}, 422, "top_k", "100"),
    ({"query": "q", "candidates": 0}, 422, "candidates", "greater than or equal to 1"),
    ({"query": "q", "collection": "nope"}, 404, "collection", "nope"),
    ({"query": 42}, 422, "query", "string"),
    ({"query": "q", "top_k": "5"}, 422, "top_k", "integer"),
    ({"query": "q", "top_k": 2.5}, 422, "top_k", "integer"),
    ({"query": "q", "rerank": "yes"}, 422, "rerank", "boolean"),
    ({"query": "q", "topk": 5}, 422, "topk", "Extra"),
    ({}, 422, "query", "Field required"),
    ([1, 2], 422, "body", "dictionary"),
]


@pytest.mark.parametrize(("body", "status", "field", "text"), BAD_INPUTS)
async def test_bad_input_gets_a_clear_json_error(settings_factory: Any, body: Any, status: int,
                                                 field: str, text: str) -> None:
    async with app_client(settings_factory()) as (_, client):
        response = await client.post("/rank", json=body)
        follow_up = await client.post("/rank", json={"query": "still serving?"})
    assert response.status_code == status
    error = response.json()["error"]
    assert error["field"] == field
    assert text in error["message"]
    assert "Traceback" not in response.text
    assert follow_up.status_code == 200


async def test_malformed_json_and_wrong_content(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        broken = await client.post("/rank", content=b'{"query": ',
                                   headers={"content-type": "application/json"})
        not_json = await client.post("/rank", content=b"query=x",
                                     headers={"content-type": "text/plain"})
        missing_route = await client.get("/nope")
        wrong_method = await client.get("/rank")
    assert broken.status_code == 400
    assert broken.json()["error"]["code"] == "invalid_json"
    assert not_json.status_code in (400, 415, 422)
    assert "error" in not_json.json()
    assert missing_route.status_code == 404
    assert missing_route.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_batch_limits_name_the_item(settings_factory: Any) -> None:
    async with app_client(settings_factory(max_batch_queries=2)) as (_, client):
        too_many = await client.post("/rank/batch", json={"queries": [{"query": "a"}] * 3})
        bad_item = await client.post("/rank/batch", json={"queries": [{"query": "a"},
                                                                       {"query": "b", "top_k": 500}]})
        empty = await client.post("/rank/batch", json={"queries": []})
    assert too_many.status_code == 422
    assert too_many.json()["error"]["field"] == "queries"
    assert "RANKD_MAX_BATCH_QUERIES" in too_many.json()["error"]["message"]
    assert bad_item.status_code == 422
    assert bad_item.json()["error"]["field"] == "queries[1].top_k"
    assert empty.status_code == 422


async def test_collection_required_when_several_are_loaded(tmp_path: Path, embedder: Embedder,
                                                           settings_factory: Any) -> None:
    entries = sample_entries()
    for name in ("alpha", "beta"):
        build_collection(entries[:10], embedder, tmp_path, name, show_progress=False)
    async with app_client(settings_factory(index_dir=tmp_path)) as (_, client):
        unnamed = await client.post("/rank", json={"query": "fractions"})
        named = await client.post("/rank", json={"query": "fractions", "collection": "beta",
                                                 "top_k": 3})
        listing = (await client.get("/collections")).json()
    assert unnamed.status_code == 422
    assert unnamed.json()["error"]["field"] == "collection"
    assert named.json()["collection"] == "beta"
    assert {c["name"] for c in listing} == {"alpha", "beta"}
    assert all(c["count"] == 10 and c["embedder"].endswith("all-MiniLM-L6-v2") for c in listing)


async def test_ready_and_health(settings_factory: Any, tmp_path: Path) -> None:
    async with app_client(settings_factory()) as (_, client):
        health = await client.get("/health")
        ready = await client.get("/ready")
    assert health.json() == {"status": "ok"}
    body = ready.json()
    assert ready.status_code == 200
    assert body["status"] == "ready"
    assert body["components"]["collection:misconceptions"]["status"] == "ok"
    assert body["components"]["reranker"]["status"] == "disabled"

    async with app_client(settings_factory(index_dir=tmp_path / "empty")) as (_, client):
        not_ready = await client.get("/ready")
        rank = await client.post("/rank", json={"query": "x"})
    assert not_ready.status_code == 503
    assert not_ready.json()["status"] == "not_ready"
    assert rank.status_code == 503
    assert "rankd index build" in rank.json()["error"]["message"]
    # Neither answer shows the server's paths; the start-up log names the directory.
    assert str(tmp_path) not in not_ready.text
    assert str(tmp_path) not in rank.text


async def test_damaged_collection_fails_or_is_skipped_as_configured(
        tmp_path: Path, embedder: Embedder, settings_factory: Any) -> None:
    from retriever.vocabulary import IndexIntegrityError

    entries = sample_entries()
    build_collection(entries, embedder, tmp_path, "good", show_progress=False)
    bad = build_collection(entries, embedder, tmp_path, "bad", show_progress=False)
    (bad / "index.faiss").write_bytes(b"truncated")
    with pytest.raises(IndexIntegrityError, match="bad"):
        async with app_client(settings_factory(index_dir=tmp_path)):
            pass
    async with app_client(settings_factory(index_dir=tmp_path, on_index_error="skip")) as (_, c):
        ready = (await c.get("/ready")).json()
        rank = await c.post("/rank", json={"query": "fractions", "collection": "good"})
    assert ready["status"] == "degraded"
    assert ready["components"]["collection:bad"]["status"] == "error"
    detail = ready["components"]["collection:bad"]["detail"]
    assert "sha256" in detail
    assert str(tmp_path) not in detail  # the log has the path, /ready its last component
    assert rank.status_code == 200


async def test_metrics_expose_stages_and_routes(settings_factory: Any) -> None:
    async with app_client(settings_factory()) as (_, client):
        await client.post("/rank", json={"query": "ratio sharing"})
        await client.post("/rank", json={"query": ""})
        text = (await client.get("/metrics")).text
    assert metric_value(text, "rankd_requests_total", route="/rank", method="POST",
                        status="200") == 1
    assert metric_value(text, "rankd_requests_total", route="/rank", method="POST",
                        status="422") == 1
    assert metric_value(text, "rankd_stage_seconds_count", stage="retrieve") == 1
    assert "rankd_queue_depth" in text
    assert metric_value(text, "rankd_request_seconds_count", route="/rank") == 2


@pytest.mark.parametrize(("message", "shown"), [
    ("index.faiss of /srv/rankd/index/eedi is damaged", "index.faiss of eedi is damaged"),
    ("rebuild /tmp/a/b/ with `rankd index build`", "rebuild b with `rankd index build`"),
    ("Milvus at http://milvus:19530/x does not answer",
     "Milvus at http://milvus:19530/x does not answer"),
    ("relative ./rankd-index stays", "relative ./rankd-index stays"),
])
def test_ready_details_show_no_server_path(message: str, shown: str) -> None:
    from service.engine import public_detail

    assert public_detail(message) == shown
