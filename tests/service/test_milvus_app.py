"""/rank served from Milvus Lite through the real app: the same answers as FAISS exact search,
failures reported in /ready and as 503s, never a 500; and on the Eedi data, the top 25 of
Milvus HNSW against FAISS exact search."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pymilvus import MilvusClient

from retriever import (
    Embedder,
    IndexKind,
    IndexSpec,
    StoreKind,
    StoreTarget,
    build_collection,
    load_collection,
    read_catalog,
)
from retriever.data import SAMPLE_INSTRUCTION, sample_entries
from retriever.eedi import eedi_queries
from retriever.vocabulary import MANIFEST, Hit
from tests.support.apps import app_client

QUERIES = ["What is 7 to the power 0? I said 0", "the median of unordered data",
           "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "Work out -4 x -3. I said -12"]
EEDI = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eedi"


@pytest.fixture
def milvus_index(tmp_path: Path, embedder: Embedder) -> Path:
    """The sample catalogue in Milvus Lite, its database inside the index directory beside the
    manifest that names it: Milvus Lite 3 makes ``milvus.db`` a directory there."""
    entries = sample_entries()
    build_collection(entries, embedder, tmp_path / "idx", "misconceptions",
                     instruction=SAMPLE_INSTRUCTION, backend=StoreKind.MILVUS,
                     target=StoreTarget(str(tmp_path / "idx" / "milvus.db")), show_progress=False)
    assert (tmp_path / "idx" / "milvus.db").is_dir()
    return tmp_path / "idx"


async def _ranks(settings: Any) -> list[dict[str, Any]]:
    async with app_client(settings) as (_, client):
        responses = [await client.post("/rank", json={"query": q, "top_k": 10}) for q in QUERIES]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


async def test_rank_from_milvus_lite_equals_faiss(settings_factory: Any,
                                                 milvus_index: Path) -> None:
    faiss_bodies = await _ranks(settings_factory())
    milvus_bodies = await _ranks(settings_factory(index_dir=milvus_index))
    for want, have in zip(faiss_bodies, milvus_bodies, strict=True):
        assert [r["id"] for r in have["results"]] == [r["id"] for r in want["results"]]
        assert [r["metadata"] for r in have["results"]] == [r["metadata"] for r in want["results"]]
        for a, b in zip(have["results"], want["results"], strict=True):
            assert a["score"] == pytest.approx(b["score"], abs=1e-5)
    async with app_client(settings_factory(index_dir=milvus_index)) as (_, client):
        ready = (await client.get("/ready")).json()
        collections = (await client.get("/collections")).json()
    assert ready["status"] == "ready"
    assert ready["components"]["collection:misconceptions"] == {
        "status": "ok", "detail": "66 entries, milvus"}
    assert collections[0]["backend"] == "milvus"
    assert collections[0]["count"] == 66


async def test_milvus_failure_while_serving_is_a_503_and_in_ready(
        settings_factory: Any, milvus_index: Path, tmp_path: Path) -> None:
    location = json.loads((milvus_index / "misconceptions" / MANIFEST).read_text())["location"]
    async with app_client(settings_factory(index_dir=milvus_index)) as (_, client):
        assert (await client.post("/rank", json={"query": QUERIES[0]})).status_code == 200
        other = MilvusClient(str(milvus_index / "milvus.db"))  # someone drops the collection
        other.drop_alias(location["alias"])
        other.drop_collection(location["collection"])
        other.close()
        response = await client.post("/rank", json={"query": QUERIES[0]})
        assert response.status_code == 503
        error = response.json()["error"]
        assert error["code"] == "retrieval_unavailable"
        assert "Milvus search of rankd_misconceptions" in error["message"]
        assert "Traceback" not in response.text
        ready = await client.get("/ready")
        assert ready.status_code == 503
        status = ready.json()["components"]["collection:misconceptions"]
        assert status["status"] == "error"
        assert "rankd_misconceptions" in status["detail"]
        assert (await client.get("/health")).status_code == 200  # the service keeps serving


async def test_unreachable_milvus_at_start_is_reported_in_ready(
        settings_factory: Any, milvus_index: Path, sample_index: Path, tmp_path: Path) -> None:
    # Two collections: the FAISS sample, and a Milvus one whose server is down.
    index_dir = tmp_path / "both"
    index_dir.mkdir()
    (index_dir / "faiss").symlink_to(sample_index / "misconceptions")
    (index_dir / "milvus").symlink_to(milvus_index / "misconceptions")
    settings = settings_factory(index_dir=index_dir, on_index_error="skip",
                                milvus_uri="http://127.0.0.1:9")
    async with app_client(settings) as (_, client):
        ready = await client.get("/ready")
        rank = await client.post("/rank", json={"query": QUERIES[0]})
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "degraded"
    detail = body["components"]["collection:milvus"]["detail"]
    assert body["components"]["collection:milvus"]["status"] == "error"
    assert "Milvus at http://127.0.0.1:9 is unreachable" in detail
    assert rank.status_code == 200  # the FAISS collection still serves


def _same_up_to_ties(exact: list[Hit], other: list[Hit], tolerance: float = 2e-5) -> bool:
    """The same ranked ids, where entries whose exact scores are equal (to float error) may
    come in either order: the Eedi catalogue holds duplicate texts, which FAISS orders by row
    and Milvus does not."""
    score = {h.id: h.score for h in exact}
    if len(exact) != len(other) or any(h.id not in score for h in other):
        return False
    return all(abs(score[a.id] - score[b.id]) <= tolerance
               for a, b in zip(exact, other, strict=True) if a.id != b.id)


@pytest.mark.slow
@pytest.mark.skipif(not (EEDI / "misconception_mapping.csv").is_file(),
                    reason=f"the Eedi evaluation data is not at {EEDI}")
def test_eedi_top25_from_milvus_hnsw_equals_faiss_exact(tmp_path: Path,
                                                        embedder: Embedder) -> None:
    entries = read_catalog(EEDI / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    queries = [q.text for q in eedi_queries(EEDI / "train.csv")]
    catalogue = embedder.encode([e.text for e in entries])
    vectors = embedder.encode(queries)
    exact = load_collection(build_collection(entries, embedder, tmp_path, "exact",
                                             vectors=catalogue, show_progress=False))
    shares = {}
    for kind in (IndexKind.FLAT, IndexKind.HNSW):
        milvus = load_collection(build_collection(
            entries, embedder, tmp_path, f"milvus-{kind.value}", vectors=catalogue,
            backend=StoreKind.MILVUS, target=StoreTarget(str(tmp_path / "eedi.db")),
            spec=IndexSpec(kind=kind), show_progress=False))
        try:
            same = [_same_up_to_ties(a, b) for a, b in zip(exact.search(vectors, 25),
                                                           milvus.search(vectors, 25),
                                                           strict=True)]
        finally:
            milvus.close()
        shares[kind.value] = sum(same) / len(same)
    print(f"Eedi, {len(queries)} queries: top-25 equal to FAISS exact: {shares}")
    assert len(queries) > 3000
    assert shares["flat"] >= 0.99
    assert shares["hnsw"] >= 0.95


def test_collection_named_like_a_milvus_lite_database_is_refused(tmp_path: Path,
                                                                 embedder: Embedder) -> None:
    entries = sample_entries()
    with pytest.raises(ValueError, match=r"ending in \.db is a Milvus Lite database"):
        build_collection(entries, embedder, tmp_path, "catalogue.db", show_progress=False)


@pytest.mark.slow
@pytest.mark.skipif(not (EEDI / "misconception_mapping.csv").is_file(),
                    reason=f"the Eedi evaluation data is not at {EEDI}")
async def test_eedi_rank_from_milvus_inside_the_index_dir_equals_faiss(
        tmp_path: Path, embedder: Embedder, settings_factory: Any) -> None:
    """The layout a user reaches for: `rankd index build --index-dir IDX --backend milvus
    --milvus-uri IDX/milvus.db` beside a FAISS collection, both served from IDX over /rank."""
    entries = read_catalog(EEDI / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    index_dir = tmp_path / "IDX"
    catalogue = embedder.encode([e.text for e in entries])
    build_collection(entries, embedder, index_dir, "faiss", vectors=catalogue,
                     show_progress=False)
    build_collection(entries, embedder, index_dir, "milvus", vectors=catalogue,
                     backend=StoreKind.MILVUS, target=StoreTarget(str(index_dir / "milvus.db")),
                     show_progress=False)
    queries = [q.text for q in eedi_queries(EEDI / "train.csv")][:120]
    ranked: dict[str, list[list[Hit]]] = {"faiss": [], "milvus": []}
    async with app_client(settings_factory(index_dir=index_dir)) as (_, client):
        ready = (await client.get("/ready")).json()
        for name, rows in ranked.items():
            for query in queries:
                response = await client.post("/rank", json={"query": query, "top_k": 25,
                                                            "collection": name})
                assert response.status_code == 200, response.text
                rows.append([Hit(r["id"], r["text"], r["score"])
                             for r in response.json()["results"]])
    assert ready["status"] == "ready"
    assert ready["components"]["collection:milvus"]["detail"] == f"{len(entries)} entries, milvus"
    same = [_same_up_to_ties(a, b) for a, b in zip(ranked["faiss"], ranked["milvus"],
                                                   strict=True)]
    assert sum(same) / len(same) >= 0.99, sum(same)
