"""Vector search at catalogue scale: FAISS flat, HNSW, IVF, IVF-PQ and Milvus Lite on a million
entries, in one run on the same queries.

Embedding a million texts on 2 cores is not practical, so the catalogue is synthetic but shaped
like a real one: ``--n`` noisy copies of the Eedi catalogue's MiniLM embeddings (each a random
catalogue entry plus Gaussian noise of ``--noise`` per dimension, renormalised), so it has the
catalogue's cluster structure at dimension 384. The queries are real: the Eedi questions'
embeddings. Exact search (``IndexFlatIP``) gives the reference top-25.

For each index and each search breadth (``ef``, ``nprobe``) it reports the build time, the
memory it took (resident memory of this process and its children, before and after the build),
p50/p99 latency of one query and of a batch of 64, and recall@25 against exact search. Milvus
Lite is built and searched through rankd's own store (retriever/stores/milvus_store.py).

    OMP_NUM_THREADS=2 .venv/bin/python bench/scale.py --n 1000000 \\
        --data ../shared/data/eedi --out scale.json

Without --data it uses the embedded sample catalogue and its queries. A benchmark, not a test:
run it on a quiet machine (the load average is printed).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

K = 25
BATCH = 64


@dataclass(frozen=True)
class Row:
    index: str
    params: str
    build_s: float
    index_mib: float  # FAISS: the serialised index; Milvus Lite: its data on disk
    rss_mib: float  # resident memory the build added (this process and its children)
    p50_ms: float
    p99_ms: float
    batch64_p50_ms: float
    batch64_p99_ms: float
    recall_at_25: float


def rss_mib() -> float:
    """Resident memory of this process and its descendants (Milvus Lite runs a child)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, stack = 0, [os.getpid()]
    page = os.sysconf("SC_PAGE_SIZE")
    while stack:
        pid = stack.pop()
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
        except OSError:
            continue
        stack += children.get(pid, [])
    return total / 2**20


def base_vectors(data: Path | None) -> tuple[np.ndarray, list[str]]:
    """The catalogue's embeddings and the query texts."""
    from rankd.devtools.catalogues import catalogue_and_queries
    from retriever import Embedder

    entries, queries = catalogue_and_queries(data)
    return Embedder.load("default", device="cpu").encode([e.text for e in entries]), queries


def synthetic(base: np.ndarray, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        rows = base[rng.integers(0, len(base), stop - start)]
        rows = rows + rng.normal(0, noise, rows.shape).astype(np.float32)
        out[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return out


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f[f >= 0]) & set(e)) / K
                          for f, e in zip(found, exact, strict=True)]))


def timed(search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray
          ) -> tuple[list[float], list[float], np.ndarray]:
    """Per-query latencies (one at a time), per-batch latencies (batches of 64), and the ids
    found one query at a time."""
    singles, found = [], []
    for row in queries:
        started = time.perf_counter()
        ids = search(row[None, :])
        singles.append(time.perf_counter() - started)
        found.append(ids[0])
    batches = []
    size = min(BATCH, len(queries))  # fewer queries than a batch: one batch of all of them
    for start in range(0, len(queries) - size + 1, size):
        started = time.perf_counter()
        search(queries[start:start + size])
        batches.append(time.perf_counter() - started)
    return singles, batches, np.array(found)


def pct(values: Sequence[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1000, 3)


def measure(name: str, params: str, build_s: float, size: float, memory: float,
            search: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
            exact: np.ndarray) -> Row:
    search(queries[:8])  # warm caches
    singles, batches, found = timed(search, queries)
    row = Row(name, params, round(build_s, 2), round(size, 1), round(memory, 1), pct(singles, 50),
              pct(singles, 99), pct(batches, 50), pct(batches, 99),
              round(recall(found, exact), 4))
    print(json.dumps(asdict(row)), flush=True)
    return row


def faiss_rows(name: str, make: Callable[[], Any], vectors: np.ndarray, queries: np.ndarray,
               exact: np.ndarray, sweep: list[tuple[str, Callable[[Any], None]]]) -> list[Row]:
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    built = [make()]  # a list, so that the index is freed before the next one is built
    build_s = time.perf_counter() - started
    memory = rss_mib() - before
    size = faiss.serialize_index(built[0]).nbytes / 2**20

    def search(q: np.ndarray) -> np.ndarray:
        return built[0].search(q, K)[1]

    rows = []
    for params, apply in sweep:
        apply(built[0])
        rows.append(measure(name, params, build_s, size, memory, search, queries, exact))
    built.clear()
    gc.collect()
    return rows


def milvus_rows(vectors: np.ndarray, queries: np.ndarray, exact: np.ndarray, kind: str,
                breadths: list[int], workdir: Path) -> list[Row]:
    from retriever.catalog import CatalogEntry
    from retriever.stores.milvus_store import MilvusBuilder, MilvusStore
    from retriever.vocabulary import IndexKind, IndexSpec, StoreTarget

    spec = IndexSpec(kind=IndexKind(kind), ivf_lists=4096 if kind == "ivf" else None)
    gc.collect()
    before = rss_mib()
    started = time.perf_counter()
    builder = MilvusBuilder("scale", vectors.shape[1], spec, StoreTarget(str(workdir / "s.db")))
    for start in range(0, len(vectors), 10_000):
        chunk = vectors[start:start + 10_000]
        builder.add_vectors([CatalogEntry(str(start + i), "") for i in range(len(chunk))], chunk)
    built = builder.finish()
    builder.publish()
    build_s = time.perf_counter() - started
    memory = rss_mib() - before
    size = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file()) / 2**20
    uri = built.location["uri"]
    rows = []
    store = MilvusStore(builder.client, uri, built.location["alias"], {})
    for breadth in breadths:
        params = {"ef": breadth} if kind == "hnsw" else {"nprobe": breadth}
        store.search_params = params

        def search(q: np.ndarray) -> np.ndarray:
            return np.array([[int(h.id) for h in hits] + [-1] * (K - len(hits))
                             for hits in store.search(q, K)])

        rows.append(measure(f"milvus-lite {kind}", json.dumps(params), build_s, size, memory,
                            search, queries, exact))
    store.close()
    return rows


def markdown(rows: list[Row]) -> str:
    lines = ["| index | search | build s | index MiB | RSS +MiB | p50 ms | p99 ms | "
             "batch-64 p50 ms | batch-64 p99 ms | recall@25 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r.index} | {r.params} | {r.build_s} | {r.index_mib} | {r.rss_mib} | {r.p50_ms} | "
              f"{r.p99_ms} | {r.batch64_p50_ms} | {r.batch64_p99_ms} | {r.recall_at_25} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="catalogue entries")
    parser.add_argument("--data", type=Path, help="Eedi data directory (default: the sample)")
    parser.add_argument("--queries", type=int, default=500, help="queries timed")
    parser.add_argument("--noise", type=float, default=0.03,
                        help="Gaussian noise per dimension of each synthetic copy")
    parser.add_argument("--indexes", default="flat,hnsw,ivf,ivfpq,milvus-ivf",
                        help="comma-separated: flat, hnsw, ivf, ivfpq, milvus-ivf, milvus-hnsw")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--lists", type=int, default=4096, help="IVF lists")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    wanted = args.indexes.split(",")

    print(f"load average {os.getloadavg()[0]:.2f}; faiss {faiss.__version__}, "
          f"{faiss.omp_get_max_threads()} threads; n={args.n}", flush=True)
    base, texts = base_vectors(args.data)
    from retriever import Embedder

    rng = np.random.default_rng(args.seed + 1)
    picked = [texts[i] for i in rng.permutation(len(texts))[: args.queries]]
    queries = Embedder.load("default", device="cpu").encode(picked)
    vectors = synthetic(base, args.n, args.noise, args.seed)
    started = time.perf_counter()
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    exact = flat.search(queries, K)[1]
    print(f"exact reference: {time.perf_counter() - started:.1f} s for {len(queries)} queries",
          flush=True)
    del flat
    dim = vectors.shape[1]
    rows: list[Row] = []

    def flat_index() -> Any:
        index = faiss.IndexFlatIP(dim)
        index.add(vectors)
        return index

    def hnsw_index() -> Any:
        index = faiss.IndexHNSWFlat(dim, args.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.add(vectors)
        return index

    def ivf(factory: str) -> Callable[[], Any]:
        def make() -> Any:
            index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
            sample = vectors[np.random.default_rng(args.seed).choice(
                len(vectors), min(len(vectors), 64 * args.lists), replace=False)]
            index.train(sample)
            index.add(vectors)
            return index
        return make

    def ef(value: int) -> tuple[str, Callable[[Any], None]]:
        return f'{{"ef": {value}}}', lambda i: setattr(i.hnsw, "efSearch", value)

    def nprobe(value: int) -> tuple[str, Callable[[Any], None]]:
        def apply(index: Any) -> None:
            faiss.extract_index_ivf(index).nprobe = value
        return f'{{"nprobe": {value}}}', apply

    def refine(value: int, factor: int) -> tuple[str, Callable[[Any], None]]:
        def apply(index: Any) -> None:
            faiss.extract_index_ivf(index).nprobe = value
            index.k_factor = factor
        return f'{{"nprobe": {value}, "k_factor": {factor}}}', apply

    if "flat" in wanted:
        rows += faiss_rows("faiss flat", flat_index, vectors, queries, exact,
                           [("exact", lambda i: None)])
    if "hnsw" in wanted:
        rows += faiss_rows(f"faiss hnsw M={args.hnsw_m}", hnsw_index, vectors, queries, exact,
                           [ef(v) for v in (32, 64, 128, 256)])
    if "ivf" in wanted:
        rows += faiss_rows(f"faiss ivf{args.lists}", ivf(f"IVF{args.lists},Flat"), vectors,
                           queries, exact, [nprobe(v) for v in (8, 16, 32, 64, 128)])
    if "ivfpq" in wanted:
        rows += faiss_rows(f"faiss ivf{args.lists}-pq48", ivf(f"IVF{args.lists},PQ48"), vectors,
                           queries, exact, [nprobe(v) for v in (16, 64)])
        rows += faiss_rows(f"faiss ivf{args.lists}-pq48+refine",
                           ivf(f"IVF{args.lists},PQ48,RFlat"), vectors, queries, exact,
                           [refine(16, 4), refine(32, 4), refine(64, 8)])
    with tempfile.TemporaryDirectory(prefix="rankd-scale-") as tmp:
        if "milvus-ivf" in wanted:
            rows += milvus_rows(vectors, queries, exact, "ivf", [16, 32, 64], Path(tmp))
        if "milvus-hnsw" in wanted:
            rows += milvus_rows(vectors, queries, exact, "hnsw", [64, 128], Path(tmp))
    print(markdown(rows))
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    if args.out:
        args.out.write_text(json.dumps({"n": args.n, "dimension": dim, "queries": len(queries),
                                        "noise": args.noise,
                                        "rows": [asdict(r) for r in rows]}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
