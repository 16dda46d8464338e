"""The embedder on ONNX Runtime and OpenVINO, float32 and int8, against sentence-transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from clients.queries import sample_queries
from retriever.data import SAMPLE_COLLECTION
from retriever.embedder import Embedder, EmbedderLoadError
from retriever.encoders import (
    EmbedderBackend,
    EmbedderQuantization,
    EmbedderVariant,
    weights_digest,
)
from retriever.index import load_collection
from retriever.sample import build_sample_collection
from retriever.vocabulary import IndexIntegrityError
from runtime.settings import SettingsError
from service.settings import load_settings
from tests.support.apps import app_client

ONNX = EmbedderVariant(EmbedderBackend.ONNX)
ONNX_INT8 = EmbedderVariant(EmbedderBackend.ONNX, EmbedderQuantization.INT8)
OPENVINO = EmbedderVariant(EmbedderBackend.OPENVINO)
OPENVINO_INT8 = EmbedderVariant(EmbedderBackend.OPENVINO, EmbedderQuantization.INT8)
VARIANTS = [ONNX, ONNX_INT8, OPENVINO, OPENVINO_INT8]
# Largest difference from the float32 torch vectors of the same texts: float32 graphs agree to
# rounding; int8 ones are further apart (Eedi figures in docs/experiments.md).
MIN_COSINE = {ONNX: 0.9999, OPENVINO: 0.999, ONNX_INT8: 0.95, OPENVINO_INT8: 0.93}


@pytest.fixture(scope="session")
def export_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedder-exports")


@pytest.fixture(scope="session")
def exported(export_cache: Path) -> dict[EmbedderVariant, Embedder]:
    return {v: Embedder.load("all-MiniLM-L6-v2", "cpu", 16, v, export_cache) for v in VARIANTS}


def texts() -> list[str]:
    # Lengths from one word to past the model's 256-token limit, so that batches pad and truncate.
    return ([q.text for q in sample_queries()] + ["x", "fractions " * 400]
            + ["Student adds the numerators and the denominators"] * 3)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_exported_vectors_match_sentence_transformers(
        variant: EmbedderVariant, exported: dict[EmbedderVariant, Embedder],
        embedder: Embedder) -> None:
    reference = embedder.encode(texts())
    vectors = exported[variant].encode(texts())
    assert vectors.shape == reference.shape
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosine = (vectors * reference).sum(axis=1)
    realistic = len(sample_queries())
    assert cosine[:realistic].min() >= MIN_COSINE[variant], (variant, cosine.min())
    # A word repeated past the token limit is far from any calibration text: int8 drifts most.
    assert cosine.min() >= 0.8, (variant, cosine)
    # The order a text comes in does not change its vector (batches are length-sorted inside).
    np.testing.assert_allclose(exported[variant].encode(texts()[::-1])[::-1], vectors, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_exported_embedder_retrieves_like_torch(
        variant: EmbedderVariant, exported: dict[EmbedderVariant, Embedder],
        embedder: Embedder) -> None:
    queries = [q.text for q in sample_queries()]
    catalogue = [q.text for q in sample_queries()][::-1]
    torch_top = np.argmax(embedder.encode(queries) @ embedder.encode(catalogue).T, axis=1)
    other = exported[variant]
    top = np.argmax(other.encode(queries) @ other.encode(catalogue).T, axis=1)
    assert (top == torch_top).all()


def test_the_export_is_cached_and_keyed_by_the_weights(export_cache: Path,
                                                       exported: dict[EmbedderVariant, Embedder],
                                                       embedder: Embedder) -> None:
    (directory,) = export_cache.iterdir()
    assert directory.name.startswith("sentence-transformers--all-MiniLM-L6-v2-")
    files = {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}
    assert {"model.onnx", "model_optimized.onnx", "model_int8.onnx", "openvino_int8.xml",
            "openvino_int8.bin"} <= set(files)
    again = Embedder.load("all-MiniLM-L6-v2", "cpu", 16, ONNX_INT8, export_cache)
    assert {p.name: p.stat().st_mtime_ns for p in directory.iterdir()} == files
    np.testing.assert_array_equal(again.encode(["one half"]),
                                  exported[ONNX_INT8].encode(["one half"]))
    # Other weights, another key: the digest covers every parameter.
    before = weights_digest(embedder.model)
    parameter = next(embedder.model.parameters())
    original = parameter.data[0, 0].item()
    try:
        parameter.data[0, 0] += 1.0
        assert weights_digest(embedder.model) != before
    finally:
        parameter.data[0, 0] = original
    assert weights_digest(embedder.model) == before


def test_a_collection_records_its_embedder_runtime(tmp_path: Path,
                                                  exported: dict[EmbedderVariant, Embedder],
                                                  embedder: Embedder) -> None:
    int8 = exported[ONNX_INT8]
    directory = build_sample_collection(int8, tmp_path)
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["embedder_variant"] == "onnx-int8"
    load_collection(directory, int8.name, int8.dimension, embedder_variant=int8.variant)
    with pytest.raises(IndexIntegrityError,
                       match=r"built with the 'onnx-int8' embedder runtime, but the configured one "
                             r"is 'torch'; set RANKD_EMBEDDER_BACKEND=onnx "
                             r"RANKD_EMBEDDER_QUANTIZATION=int8"):
        load_collection(directory, embedder.name, embedder.dimension,
                        embedder_variant=embedder.variant)


async def test_the_service_serves_an_int8_onnx_collection(
        tmp_path: Path, export_cache: Path, exported: dict[EmbedderVariant, Embedder]) -> None:
    build_sample_collection(exported[ONNX_INT8], tmp_path)
    settings = load_settings(index_dir=tmp_path, embedder_device="cpu", embedder_backend="onnx",
                             embedder_quantization="int8", embedder_cache_dir=export_cache,
                             reranker={"backend": "none"})
    query = sample_queries()[0]
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": query.text, "top_k": 5,
                                                     "collection": SAMPLE_COLLECTION})
        assert response.status_code == 200, response.text
        ids = [r["id"] for r in response.json()["results"]]
        assert query.relevant[0] in ids
        ready = (await client.get("/ready")).json()
        assert ready["status"] == "ready"


def test_torch_int8_is_refused_in_one_line() -> None:
    with pytest.raises(SettingsError) as refused:
        load_settings(embedder_backend="torch", embedder_quantization="int8")
    assert "RANKD_EMBEDDER_QUANTIZATION=int8 needs RANKD_EMBEDDER_BACKEND=onnx or openvino" in str(
        refused.value)


def test_a_gpu_device_with_an_exported_runtime_is_a_clear_error() -> None:
    with pytest.raises(EmbedderLoadError, match=r"runs on the CPU.*RANKD_EMBEDDER_DEVICE=cpu"):
        Embedder.load("all-MiniLM-L6-v2", "cuda", variant=ONNX)


def test_an_export_moves_the_file_that_marks_it_last(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A start beside this one checks the target file: the files it needs are there first."""
    import os

    from retriever import encoders

    moved: list[str] = []
    real_replace = os.replace

    def recording_replace(source: Path, destination: Path) -> None:
        moved.append(Path(destination).name)
        real_replace(source, destination)

    def write(partial: Path) -> None:  # as OpenVINO saves: the graph, then its weights
        partial.write_text("graph")
        partial.with_suffix(".bin").write_bytes(b"weights")

    monkeypatch.setattr(encoders.os, "replace", recording_replace)
    target = tmp_path / "exports" / "model.xml"
    assert encoders._atomic(target, write) == target
    assert moved == ["model.bin", "model.xml"]
    assert target.read_text() == "graph"
    assert target.with_suffix(".bin").read_bytes() == b"weights"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin", "model.xml"]
    # Once there, it is read, not written again.
    assert encoders._atomic(target, lambda _: pytest.fail("exported twice")) == target
