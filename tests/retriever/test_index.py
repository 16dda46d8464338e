from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from retriever import Embedder, IndexIntegrityError, IndexKind, build_collection, load_collection
from retriever.catalog import CatalogEntry
from retriever.data import sample_entries
from retriever.index import collection_dirs
from retriever.vocabulary import ENTRIES_FILE, INDEX_FILE, MANIFEST


@pytest.fixture(scope="module")
def entries() -> list[CatalogEntry]:
    return sample_entries()


def test_build_writes_manifest_with_checksums(tmp_path: Path, embedder: Embedder,
                                              entries: list[CatalogEntry]) -> None:
    path = build_collection(entries, embedder, tmp_path, "m", instruction="Pick one.",
                            show_progress=False)
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["embedder"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert manifest["dimension"] == 384
    assert manifest["count"] == len(entries)
    assert manifest["instruction"] == "Pick one."
    assert set(manifest["files"]) == {INDEX_FILE, ENTRIES_FILE}
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert manifest["created_at"]


def test_search_matches_numpy_reference(tmp_path: Path, embedder: Embedder,
                                        entries: list[CatalogEntry]) -> None:
    build_collection(entries, embedder, tmp_path, "m", show_progress=False)
    collection = load_collection(tmp_path / "m", embedder.name, embedder.dimension)
    queries = ["What is 7 to the power 0? I said 0", "the median of unordered data",
               "area of a triangle, forgot to halve"]
    query_vectors = embedder.encode(queries)
    # Independent reference: normalised embeddings from the raw model, plain numpy dot products.
    raw_docs = embedder.model.encode([e.text for e in entries], convert_to_numpy=True)
    raw_queries = embedder.model.encode(queries, convert_to_numpy=True)
    docs = raw_docs / np.linalg.norm(raw_docs, axis=1, keepdims=True)
    qs = raw_queries / np.linalg.norm(raw_queries, axis=1, keepdims=True)
    expected = np.argsort(-(qs @ docs.T), axis=1, kind="stable")[:, :10]
    hits = collection.search(query_vectors, 10)
    for row, row_hits in enumerate(hits):
        assert [h.id for h in row_hits] == [entries[i].id for i in expected[row]]
        scores = [h.score for h in row_hits]
        assert scores == sorted(scores, reverse=True)
        np.testing.assert_allclose(scores, (qs @ docs.T)[row, expected[row]], atol=1e-5)


@pytest.mark.parametrize("kind", [IndexKind.HNSW, IndexKind.IVF])
def test_approximate_indexes_find_the_exact_top_hit(tmp_path: Path, embedder: Embedder,
                                                    entries: list[CatalogEntry],
                                                    kind: IndexKind) -> None:
    build_collection(entries, embedder, tmp_path, "flat", show_progress=False)
    build_collection(entries, embedder, tmp_path, "approx", kind=kind, show_progress=False)
    exact = load_collection(tmp_path / "flat")
    approx = load_collection(tmp_path / "approx")
    assert approx.manifest.index_kind == kind.value
    vectors = embedder.encode([e.text for e in entries[:20]])
    # On a catalogue this small, with the default search breadth, recall@1 is perfect.
    assert [h[0].id for h in approx.search(vectors, 5)] == [h[0].id for h in exact.search(vectors, 5)]


def test_interrupted_build_leaves_previous_index_intact(tmp_path: Path, embedder: Embedder,
                                                        entries: list[CatalogEntry],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    build_collection(entries, embedder, tmp_path, "m", show_progress=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the index is written

    monkeypatch.setattr("faiss.write_index", crash)
    with pytest.raises(KeyboardInterrupt):
        build_collection(entries[:5], embedder, tmp_path, "m", show_progress=False)
    after = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    assert after == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging debris
    assert len(load_collection(tmp_path / "m", embedder.name, embedder.dimension)) == len(entries)


def test_rebuild_replaces_the_collection(tmp_path: Path, embedder: Embedder,
                                         entries: list[CatalogEntry]) -> None:
    build_collection(entries, embedder, tmp_path, "m", show_progress=False)
    build_collection(entries[:5], embedder, tmp_path, "m", show_progress=False)
    assert len(load_collection(tmp_path / "m")) == 5
    assert collection_dirs(tmp_path) == [tmp_path / "m"]


@pytest.fixture
def built(tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry]) -> Path:
    return build_collection(entries, embedder, tmp_path, "m", show_progress=False)


def test_tampered_entries_file_is_refused(built: Path) -> None:
    path = built / ENTRIES_FILE
    path.write_text(path.read_text().replace("Believes", "Knows"))
    with pytest.raises(IndexIntegrityError, match=r"entries\.jsonl.*sha256.*rankd index build"):
        load_collection(built)


def test_truncated_index_file_is_refused(built: Path) -> None:
    path = built / INDEX_FILE
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(IndexIntegrityError, match=r"index\.faiss"):
        load_collection(built)


def test_missing_manifest_is_refused(built: Path) -> None:
    (built / MANIFEST).unlink()
    with pytest.raises(IndexIntegrityError, match=r"manifest\.json is missing"):
        load_collection(built)


def test_embedder_mismatch_names_both_and_the_fix(built: Path) -> None:
    with pytest.raises(IndexIntegrityError,
                       match=r"all-MiniLM-L6-v2.*other/model.*RANKD_EMBEDDER_MODEL"):
        load_collection(built, "other/model", 384)
    with pytest.raises(IndexIntegrityError, match="dimension 384"):
        load_collection(built, None, 768)


def test_missing_index_file_is_refused(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(built, copy)
    (copy / INDEX_FILE).unlink()
    with pytest.raises(IndexIntegrityError, match="missing"):
        load_collection(copy)
