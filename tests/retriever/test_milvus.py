"""The Milvus store on Milvus Lite, for real: build, search, atomic rebuilds and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from rankd.cli import main
from rankd.devtools.ports import free_port
from retriever import (
    CollectionUnavailableError,
    Embedder,
    IndexIntegrityError,
    IndexKind,
    IndexSpec,
    StoreKind,
    StoreTarget,
    build_collection,
    load_collection,
)
from retriever.catalog import CatalogEntry
from retriever.data import sample_catalog_path, sample_entries
from retriever.stores.milvus_store import MilvusBuilder, alias_for
from retriever.vocabulary import MANIFEST

QUERIES = ["What is 7 to the power 0? I said 0", "the median of unordered data",
           "area of a triangle, forgot to halve", "Calculate 1/2 + 1/3. Incorrect answer: 2/5"]


@pytest.fixture(scope="module")
def entries() -> list[CatalogEntry]:
    return sample_entries()


def _milvus(tmp_path: Path, **spec: object) -> dict[str, object]:
    return {"backend": StoreKind.MILVUS, "target": StoreTarget(str(tmp_path / "milvus.db")),
            "spec": IndexSpec(**spec), "show_progress": False}  # type: ignore[arg-type]


def _physical_collections(db: Path) -> list[str]:
    client = MilvusClient(str(db))
    try:
        return sorted(client.list_collections())
    finally:
        client.close()


def test_flat_milvus_search_equals_faiss_exact(tmp_path: Path, embedder: Embedder,
                                               entries: list[CatalogEntry]) -> None:
    faiss_dir = build_collection(entries, embedder, tmp_path / "faiss", "m", show_progress=False)
    milvus_dir = build_collection(entries, embedder, tmp_path / "milvus", "m", **_milvus(tmp_path))
    manifest = json.loads((milvus_dir / MANIFEST).read_text())
    assert manifest["backend"] == "milvus"
    assert manifest["count"] == len(entries)
    assert manifest["dimension"] == 384
    assert manifest["embedder"] == embedder.name
    assert manifest["files"] == {}  # nothing but the manifest is on disk
    assert manifest["location"]["uri"] == str((tmp_path / "milvus.db").resolve())
    assert manifest["location"]["alias"] == "rankd_m"
    assert [p.name for p in milvus_dir.iterdir()] == [MANIFEST]

    exact = load_collection(faiss_dir)
    milvus = load_collection(milvus_dir, embedder.name, embedder.dimension)
    try:
        vectors = embedder.encode(QUERIES)
        expected = exact.search(vectors, 10)
        got = milvus.search(vectors, 10)
        for want, have in zip(expected, got, strict=True):
            assert [h.id for h in have] == [h.id for h in want]
            assert [h.text for h in have] == [h.text for h in want]
            assert [h.metadata for h in have] == [h.metadata for h in want]
            np.testing.assert_allclose([h.score for h in have], [h.score for h in want],
                                       atol=1e-5)
        assert milvus.health() is None
    finally:
        milvus.close()


@pytest.mark.parametrize(("kind", "params"), [(IndexKind.HNSW, {"ef": 64}),
                                              (IndexKind.IVF, {"nprobe": 4})])
def test_approximate_milvus_indexes_record_their_search_params(
        tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry], kind: IndexKind,
        params: dict[str, int]) -> None:
    spec = {"kind": kind, "ef_search": params.get("ef", 128), "nprobe": params.get("nprobe", 16),
            "ivf_lists": 2}
    directory = build_collection(entries, embedder, tmp_path / "idx", "m",
                                 **_milvus(tmp_path, **spec))
    manifest = json.loads((directory / MANIFEST).read_text())
    assert manifest["index_kind"] == kind.value
    assert manifest["search_params"] == params
    collection = load_collection(directory)
    try:
        vectors = embedder.encode([e.text for e in entries[:10]])
        assert [hits[0].id for hits in collection.search(vectors, 3)] == \
            [e.id for e in entries[:10]]
        client = MilvusClient(str(tmp_path / "milvus.db"))
        index = client.describe_index(manifest["location"]["collection"], "vector")
        client.close()
        assert index["index_type"] == {"hnsw": "HNSW", "ivf": "IVF_FLAT"}[kind.value]
    finally:
        collection.close()


def test_rebuild_switches_the_alias_and_drops_the_old_collection(
        tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry]) -> None:
    first = json.loads((build_collection(entries, embedder, tmp_path / "idx", "m",
                                         **_milvus(tmp_path)) / MANIFEST).read_text())
    second = json.loads((build_collection(entries[:5], embedder, tmp_path / "idx", "m",
                                          **_milvus(tmp_path)) / MANIFEST).read_text())
    assert first["location"]["collection"] != second["location"]["collection"]
    assert _physical_collections(tmp_path / "milvus.db") == [second["location"]["collection"]]
    collection = load_collection(tmp_path / "idx" / "m")
    try:
        assert len(collection) == 5
        assert len(collection.search(embedder.encode(QUERIES[:1]), 25)[0]) == 5
    finally:
        collection.close()


def test_interrupted_build_leaves_the_served_collection_alone(
        tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory = build_collection(entries, embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    before = (directory / MANIFEST).read_bytes()
    served = json.loads(before)["location"]["collection"]

    def crash(self: MilvusBuilder) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while the index builds

    monkeypatch.setattr(MilvusBuilder, "finish", crash)
    with pytest.raises(KeyboardInterrupt):
        build_collection(entries[:5], embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    assert (directory / MANIFEST).read_bytes() == before
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["m"]  # no staging debris
    assert _physical_collections(tmp_path / "milvus.db") == [served]  # the new one is dropped
    collection = load_collection(directory)
    try:
        assert len(collection) == len(entries)
    finally:
        collection.close()


def test_publish_failure_after_the_switch_points_the_alias_back(
        tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry],
        monkeypatch: pytest.MonkeyPatch) -> None:
    directory = build_collection(entries, embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    served = json.loads((directory / MANIFEST).read_text())["location"]["collection"]

    def crash(staging: Path, final: Path) -> None:
        raise OSError("disk full")  # the alias was switched, the directory rename fails

    monkeypatch.setattr("retriever.index._swap_into_place", crash)
    with pytest.raises(OSError, match="disk full"):
        build_collection(entries[:5], embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    client = MilvusClient(str(tmp_path / "milvus.db"))
    try:
        assert client.describe_alias(alias_for("m"))["collection_name"] == served
    finally:
        client.close()
    collection = load_collection(directory)
    try:
        assert len(collection) == len(entries)
    finally:
        collection.close()


def test_unreachable_server_is_a_clear_error(tmp_path: Path, embedder: Embedder,
                                             entries: list[CatalogEntry]) -> None:
    directory = build_collection(entries, embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(CollectionUnavailableError, match=rf"Milvus at {uri} is unreachable.*"
                                                         r"RANKD_MILVUS_URI"):
        load_collection(directory, target=StoreTarget(uri))


def test_missing_collection_and_dimension_mismatch_are_clear_errors(
        tmp_path: Path, embedder: Embedder, entries: list[CatalogEntry]) -> None:
    directory = build_collection(entries, embedder, tmp_path / "idx", "m", **_milvus(tmp_path))
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest["dimension"] = 768
    (directory / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(IndexIntegrityError, match=r"dimension 384.*says 768"):
        load_collection(directory)
    client = MilvusClient(str(tmp_path / "milvus.db"))
    client.drop_alias(manifest["location"]["alias"])
    client.drop_collection(manifest["location"]["collection"])
    client.close()
    with pytest.raises(CollectionUnavailableError, match=r"has no collection 'rankd_m'.*--backend milvus"):
        load_collection(directory)


def test_cli_builds_a_milvus_collection(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = tmp_path / "cli.db"
    code = main(["index", "build", "--catalog", str(sample_catalog_path()),
                 "--id-column", "MisconceptionId", "--text-column", "MisconceptionName",
                 "--collection", "sample", "--index-dir", str(tmp_path / "idx"),
                 "--backend", "milvus", "--milvus-uri", str(db), "--index-type", "hnsw",
                 "--ef", "96", "--quiet"])
    assert code == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["backend"] == "milvus"
    assert report["search_params"] == {"ef": 96}
    assert report["location"]["uri"] == str(db.resolve())
    assert _physical_collections(db) == [report["location"]["collection"]]


def test_cli_refuses_milvus_without_a_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RANKD_MILVUS_URI", raising=False)
    code = main(["index", "build", "--catalog", str(sample_catalog_path()),
                 "--id-column", "MisconceptionId", "--text-column", "MisconceptionName",
                 "--collection", "sample", "--index-dir", str(tmp_path), "--backend", "milvus"])
    assert code == 2
    assert "--backend milvus needs --milvus-uri" in capsys.readouterr().err


def test_entries_read_back_in_build_order(tmp_path: Path, embedder: Embedder,
                                          entries: list[CatalogEntry]) -> None:
    collection = load_collection(build_collection(entries, embedder, tmp_path / "idx", "m",
                                                  **_milvus(tmp_path)))
    try:
        assert collection.entries == entries
    finally:
        collection.close()
