"""The openvino backend against the transformers backend on the tiny LM: the same label
probabilities on the same prompts, through each of the transformers backend's pass shapes
(whole prompts left-padded, a shared prefix then right-padded suffixes over its cache, a long
prompt filled in chunks over its own cache), in both scoring modes; its graph converted once
and read from the cache after; and served by the app under RANKD_RERANKER_BACKEND=openvino."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from reranker import ListwiseTask
from reranker.backends.openvino_backend import OpenVinoBackend
from reranker.backends.transformers_backend import TransformersBackend
from reranker.errors import RerankerConfigError
from retriever.catalog import CatalogEntry
from tests.reranker.conftest import make_task, open_scorer
from tests.support.apps import app_client

pytest.importorskip("openvino")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of converted graphs for the module: the tiny LM converts once."""
    return tmp_path_factory.mktemp("openvino-graphs")


def _tasks(catalogue: list[CatalogEntry]) -> list[ListwiseTask]:
    # Lengths differ across tasks, so whole-prompt passes are left-padded; the orders of a
    # task share their prefix.
    return [make_task(catalogue[:10], "Calculate 1/2 + 1/3. Incorrect answer: 2/5"),
            make_task(catalogue[5:9], "short"),
            make_task(catalogue[20:30], "a much longer query " * 6)]


async def _probabilities(model: Path, backend: str, tasks: list[ListwiseTask], cache: Path,
                         **config: Any) -> list[list[float]]:
    async with open_scorer(backend, model=str(model), cache_dir=cache, batch_wait_ms=50,
                           timeout_s=600, **config) as scorer:
        expected = OpenVinoBackend if backend == "openvino" else TransformersBackend
        assert type(scorer.backend) is expected
        scored = await scorer.rank(tasks)
    return [o.probabilities for s in scored for o in s.orders]


def _assert_close(got: list[list[float]], want: list[list[float]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < TOLERANCE, (a, b)


@pytest.mark.parametrize("shape", [
    {"prefix_sharing": False},  # whole prompts, left-padded, one pass
    {"prefix_sharing": True},  # each prefix once, then the suffixes over its cache
    {"batch_tokens": 64, "prefix_sharing": False},  # long prompts in chunks over their cache
])
@pytest.mark.parametrize("scoring", ["listwise", "pointwise"])
async def test_it_scores_as_the_transformers_backend_does(
        tiny_lm: Path, catalogue: list[CatalogEntry], graphs: Path, scoring: str,
        shape: dict[str, Any]) -> None:
    tasks = _tasks(catalogue)
    want = await _probabilities(tiny_lm, "transformers", tasks, graphs, scoring=scoring,
                                **shape)
    got = await _probabilities(tiny_lm, "openvino", tasks, graphs, scoring=scoring, **shape)
    _assert_close(got, want)
    # The probabilities are not all alike, or agreement would say nothing.
    assert max(max(p) - min(p) for p in want) > 0.05


def _graph_files(cache: Path) -> tuple[Path, list[Path]]:
    """The converted graph in ``cache``, and anything half-built left beside it."""
    (graph,) = cache.glob("openvino-*/decoder.xml")
    return graph, [*cache.glob("openvino-*/*partial*"), *cache.glob(".openvino-*")]


async def test_the_graph_is_converted_once_then_read_from_the_cache(
        tiny_lm: Path, catalogue: list[CatalogEntry], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = _tasks(catalogue)[:1]
    caplog.set_level(logging.INFO, logger="reranker.backends.openvino_backend")
    first = await _probabilities(tiny_lm, "openvino", tasks, tmp_path)
    graph, partial = _graph_files(tmp_path)
    assert graph.with_suffix(".bin").is_file()
    assert not partial
    written = graph.stat().st_mtime_ns
    second = await _probabilities(tiny_lm, "openvino", tasks, tmp_path)
    assert graph.stat().st_mtime_ns == written  # read, not converted again
    _assert_close(second, first)
    assert "openvino reranker" in caplog.text


async def test_it_refuses_what_it_cannot_run(tiny_lm: Path, graphs: Path) -> None:
    with pytest.raises(RerankerConfigError, match="RANKD_RERANKER_QUANTIZATION=none"):
        async with open_scorer("openvino", model=str(tiny_lm), cache_dir=graphs,
                               quantization="int8"):
            pass
    with pytest.raises(RerankerConfigError, match="float32 or bfloat16"):
        async with open_scorer("openvino", model=str(tiny_lm), cache_dir=graphs,
                               dtype="float16"):
            pass


async def test_the_app_serves_it(settings_factory: Any, tiny_lm: Path, graphs: Path) -> None:
    settings = settings_factory(reranker_backend="openvino", reranker_model=str(tiny_lm),
                                reranker_cache_dir=graphs)
    async with app_client(settings) as (_, client):
        ready = await client.get("/ready")
        assert ready.status_code == 200, ready.text
        assert "backend openvino" in ready.text
        response = await client.post("/v1/rerank", json={
            "query": "negative numbers", "documents": ["a", "b c", "d e f"]})
        assert response.status_code == 200, response.text
        assert len(response.json()["results"]) == 3
        ranked = await client.post("/rank", json={"query": "Calculate 1/2 + 1/3"})
        assert ranked.status_code == 200, ranked.text
        assert ranked.json()["reranked"] is True
