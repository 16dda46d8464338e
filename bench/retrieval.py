"""Retrieval benchmark: the embedder's runtimes raw and through the service, and a peer, in one run.

Every runtime of ``--variants`` (torch, onnx, onnx-int8, openvino, openvino-int8) is measured
on the same queries:

1. Raw: ``Embedder.encode`` of the query set in this process at each batch size of
   ``--batch-sizes``; the fastest is that runtime's reference.
2. Agreement: the catalogue and the queries embedded by the runtime, searched exactly; the share
   of queries whose top-``--top-k`` ids equal the torch float32 top-k (as a set, and in order),
   and MAP@k when the queries carry labels (Eedi).
3. Service: ``rankd serve`` per runtime in a child process on a loopback port (rerank off,
   ``RANKD_EMBEDDER_BACKEND``/``_QUANTIZATION`` set, its own index built with that runtime),
   driven by the load-test harness's closed loop (clients/loadtest.py) at each
   ``--concurrency`` level.
4. The peer: infinity-emb serving the same MiniLM weights (torch engine, ``--infinity-batch``),
   its OpenAI-compatible ``/embeddings`` driven by the same closed loop: embed only, where
   rankd's ``/rank`` also searches and returns JSON. ``--no-infinity`` skips it; its venv comes
   from scripts/setup_infinity.sh.
5. ``--repeats`` rounds, each visiting every runtime (one raw pass, every level) and the peer
   in turn, so all see the same background load; the best of each is kept.

    python bench/retrieval.py --input ../shared/data/eedi/train.csv --format eedi --size 384 \\
        --catalog ../shared/data/eedi/misconception_mapping.csv \\
        --id-column MisconceptionId --text-column MisconceptionName --torch-threads 2

Without --input/--catalog it uses the sample catalogue and its query set (cycled to --size). A
benchmark, not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.api import RankOptions
from clients.loadtest import LevelResult, LoadConfig, run_loadtest
from clients.queries import Query, QueryFileOptions, read_queries, sample_queries
from rankd.devtools.ports import free_port
from rankd.devtools.processes import stop_process
from rankd.devtools.serving import start_child

if TYPE_CHECKING:
    from retriever import Embedder
    from retriever.catalog import CatalogEntry
    from retriever.encoders import EmbedderVariant


@dataclass(frozen=True)
class RawResult:
    batch_size: int
    seconds: float
    throughput: float
    cpu_ms_per_query: float  # CPU time of this process (all threads) per query


@dataclass(frozen=True)
class ServiceResult:
    level: LevelResult
    server_cpu_ms_per_query: float | None  # the server process, all threads
    client_cpu_ms_per_query: float  # this process: the load generator


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def load_queries(args: argparse.Namespace) -> list[Query]:
    """The query set, cycled or cut to ``--size`` queries (ids made unique when cycled)."""
    base = sample_queries() if args.input is None else read_queries(args.input, args.format,
                                                                     QueryFileOptions())
    size = args.size or len(base)
    return [Query(f"{base[i % len(base)].id}#{i // len(base)}", base[i % len(base)].text,
                  base[i % len(base)].relevant) for i in range(size)]


def read_entries(args: argparse.Namespace) -> tuple[list[CatalogEntry], str]:
    from retriever import read_catalog
    from retriever.data import (
        SAMPLE_COLLECTION,
        sample_entries,
    )

    if args.catalog is None:
        return (sample_entries(),
                SAMPLE_COLLECTION)
    return read_catalog(Path(args.catalog), args.id_column, args.text_column), args.collection


def raw_pass(embedder: Embedder, texts: list[str], batch_size: int) -> RawResult:
    """Encode every text once, as the library would, at ``batch_size``."""
    embedder.batch_size = batch_size
    started, cpu_started = time.perf_counter(), time.process_time()
    embedder.encode(texts)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return RawResult(batch_size, seconds, len(texts) / seconds, 1000 * cpu / len(texts))


def start_service(index_dir: Path, port: int, model: str, variant: EmbedderVariant,
                  extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "RANKD_INDEX_DIR": str(index_dir), "RANKD_EMBEDDER_MODEL": model,
           "RANKD_EMBEDDER_BACKEND": variant.backend.value,
           "RANKD_EMBEDDER_QUANTIZATION": variant.quantization.value,
           "RANKD_EMBEDDER_DEVICE": "cpu", "RANKD_RERANKER_BACKEND": "none",
           "RANKD_LOG_LEVEL": "warning", **extra_env}
    url = f"http://127.0.0.1:{port}"
    process = start_child([sys.executable, "-m", "rankd.cli", "serve", "--host", "127.0.0.1",
                           "--port", str(port)], env, f"{url}/ready", f"rankd serve ({variant})")
    return process, url


def start_infinity(python: str, model_dir: str, port: int, batch_size: int,
                   threads: int | None) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "INFINITY_ANONYMOUS_USAGE_STATS": "0"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    executable = str(Path(python).with_name("infinity_emb"))
    url = f"http://127.0.0.1:{port}"
    process = start_child(
        [executable, "v2", "--model-id", model_dir, "--port", str(port), "--host", "127.0.0.1",
         "--engine", "torch", "--device", "cpu", "--batch-size", str(batch_size),
         "--no-vector-disk-cache", "--log-level", "warning"], env, f"{url}/health",
        "infinity_emb")
    return process, url


def service_level(url: str, server_pid: int, queries: list[Query], concurrency: int,
                  requests: int, rank: RankOptions,
                  embeddings_model: str | None = None) -> ServiceResult:
    """One closed-loop level, with the CPU time both processes spent on it."""
    config = LoadConfig(url=url, rank=rank, concurrency=(concurrency,), requests=requests,
                        warmup=0, timeout_s=120.0, embeddings_model=embeddings_model)
    server_before, client_before = process_cpu_seconds(server_pid), time.process_time()
    (level,) = asyncio.run(run_loadtest(queries, config)).levels
    server_after, client_after = process_cpu_seconds(server_pid), time.process_time()
    server_cpu = (None if server_before is None or server_after is None
                  else 1000 * (server_after - server_before) / level.requests)
    return ServiceResult(level, server_cpu, 1000 * (client_after - client_before) / level.requests)


@dataclass
class System:
    """One runtime of rankd (or the peer) under test, and what was measured of it."""

    name: str
    variant: EmbedderVariant | None  # None: the peer
    embedder: Embedder | None = None
    index_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    best_batch: int = 0
    sweep: list[RawResult] = field(default_factory=list)
    raws: list[RawResult] = field(default_factory=list)
    levels: dict[int, list[ServiceResult]] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)


def exact_top(vectors: np.ndarray, catalogue: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ catalogue.T
    top = np.argpartition(-scores, min(k, scores.shape[1] - 1), axis=1)[:, :k]
    order = np.take_along_axis(scores, top, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(top, order, axis=1)


def agreement(top: np.ndarray, reference: np.ndarray, ids: list[str],
              queries: list[Query], k: int) -> dict[str, float]:
    from retriever.evaluation import average_precision

    same_set = float(np.mean([set(a) == set(b) for a, b in zip(top, reference, strict=True)]))
    same_order = float(np.mean([list(a) == list(b) for a, b in zip(top, reference, strict=True)]))
    labelled = [(row, q) for row, q in zip(top, queries, strict=True) if q.relevant]
    figures = {"top_k_same_set": same_set, "top_k_same_order": same_order}
    if labelled:
        figures["map"] = float(np.mean([average_precision([ids[i] for i in row], q.relevant, k)
                                        for row, q in labelled]))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", type=Path, help="query file (default: the sample query set)")
    parser.add_argument("--format", choices=["eedi", "jsonl", "csv"], default="jsonl")
    parser.add_argument("--size", type=int, default=512,
                        help="queries in the set: the file's first N, or it cycled to N "
                             "(default 512; 0 = the file as it is)")
    parser.add_argument("--catalog", help="catalogue to index (default: the sample catalogue)")
    parser.add_argument("--id-column", default="MisconceptionId")
    parser.add_argument("--text-column", default="MisconceptionName")
    parser.add_argument("--collection", default="bench")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--variants", default="torch,onnx,onnx-int8,openvino,openvino-int8",
                        help="embedder runtimes, comma-separated; torch first is the reference")
    parser.add_argument("--batch-sizes", type=_ints, default=[8, 16, 32, 64, 128])
    parser.add_argument("--concurrency", type=_ints, default=[1, 16, 64])
    parser.add_argument("--c1-requests", type=int, default=96,
                        help="requests at concurrency 1 (latency-bound and slow; default 96)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="rounds over every runtime and the peer; the best of each is kept "
                             "(default 2)")
    parser.add_argument("--top-k", type=int, default=25)
    parser.add_argument("--torch-threads", type=int,
                        help="intra-op threads of every runtime, in this process, the services "
                             "and the peer (OMP_NUM_THREADS there); default: torch's own choice")
    parser.add_argument("--no-infinity", action="store_true", help="skip the infinity-emb peer")
    parser.add_argument("--infinity-python",
                        help="the infinity-emb venv's python (default: scripts/setup_infinity.sh)")
    parser.add_argument("--infinity-batch", type=int, default=32)
    parser.add_argument("--env", action="append", default=[], metavar="RANKD_X=VALUE",
                        help="extra settings for the services (repeatable)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from retriever import Embedder, build_collection
    from retriever.embedder import resolve_model
    from retriever.encoders import EmbedderVariant

    extra_env = dict(item.split("=", 1) for item in args.env)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        extra_env.update(OMP_NUM_THREADS=str(args.torch_threads),
                         MKL_NUM_THREADS=str(args.torch_threads))
    queries = load_queries(args)
    texts = [q.text for q in queries]
    entries, collection = read_entries(args)
    ids = [e.id for e in entries]
    print(f"{len(queries)} queries, {len(entries)} catalogue entries; {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}",
          flush=True)
    systems = [System(v.strip(), EmbedderVariant.parse(v)) for v in args.variants.split(",")]
    rank = RankOptions(top_k=args.top_k, rerank=False, collection=collection)
    loads = [os.getloadavg()[0]]
    peer: System | None = None
    with tempfile.TemporaryDirectory(prefix="rankd-bench-") as tmp:
        extra_env.setdefault("RANKD_EMBEDDER_CACHE_DIR", str(Path(tmp) / "exports"))
        cache = Path(extra_env["RANKD_EMBEDDER_CACHE_DIR"])
        reference: np.ndarray | None = None
        try:
            for system in systems:
                assert system.variant is not None
                embedder = Embedder.load(args.model, "cpu", 32, system.variant, cache)
                system.embedder = embedder
                raw_pass(embedder, texts[:64], 32)  # warm-up
                system.sweep = [raw_pass(embedder, texts, b) for b in args.batch_sizes]
                system.best_batch = max(system.sweep, key=lambda r: r.throughput).batch_size
                print(f"  {system.name}: raw encode "
                      + ", ".join(f"b{r.batch_size} {r.throughput:.1f}" for r in system.sweep)
                      + " q/s", flush=True)
                vectors = embedder.encode([e.text for e in entries])
                top = exact_top(embedder.encode(texts), vectors, args.top_k)
                reference = top if reference is None else reference
                system.agreement = agreement(top, reference, ids, queries, args.top_k)
                system.index_dir = Path(tmp) / system.name
                build_collection(entries, embedder, system.index_dir, collection,
                                 show_progress=False, vectors=vectors)
                system.process, system.url = start_service(
                    system.index_dir, free_port(), args.model, system.variant, extra_env)
                system.levels = {c: [] for c in args.concurrency}
            if not args.no_infinity:
                from rankd.devtools.venvs import side_venv_python

                python = args.infinity_python or side_venv_python(
                    "RANKD_INFINITY_PYTHON", "setup_infinity.sh")
                peer = System("infinity-emb 0.0.78 (torch)", None)
                peer.process, peer.url = start_infinity(
                    python, resolve_model(args.model).location, free_port(),
                    args.infinity_batch, args.torch_threads)
                peer.levels = {c: [] for c in args.concurrency}
            everyone = systems + ([peer] if peer else [])
            model_name = resolve_model(args.model).location
            for system in everyone:  # warm-up
                assert system.process is not None
                service_level(system.url, system.process.pid, queries, 4, 64, rank,
                              None if system.variant else model_name)
            for round_no in range(1, args.repeats + 1):
                line = [f"round {round_no}:"]
                for system in everyone:
                    assert system.process is not None
                    if system.embedder is not None:
                        raw = raw_pass(system.embedder, texts, system.best_batch)
                        system.raws.append(raw)
                        line.append(f"{system.name} raw {raw.throughput:.1f}")
                    for c in args.concurrency:
                        requests = args.c1_requests if c == 1 else len(queries)
                        result = service_level(system.url, system.process.pid, queries, c,
                                               requests, rank,
                                               None if system.variant else model_name)
                        system.levels[c].append(result)
                        line.append(f"c{c} {result.level.throughput:.1f}")
                loads.append(os.getloadavg()[0])
                print("  " + " ".join(line) + f" q/s; load average {loads[-1]:.2f}", flush=True)
        finally:
            for system in systems + ([peer] if peer else []):
                if system.process is not None:
                    stop_process(system.process)

    report(args, systems, peer, queries, loads)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "queries": len(queries), "top_k": args.top_k, "load_average": loads,
            "torch_threads": torch.get_num_threads(),
            "systems": [summary(s, args.concurrency) for s in systems + ([peer] if peer else [])],
        }, indent=2) + "\n", encoding="utf-8")
    return 0


def best_level(system: System, concurrency: int) -> ServiceResult | None:
    results = system.levels.get(concurrency) or []
    return max(results, key=lambda r: r.level.throughput) if results else None


def summary(system: System, levels: list[int]) -> dict[str, Any]:
    best = max(system.raws, key=lambda r: r.throughput) if system.raws else None
    service: dict[str, Any] = {}
    for c in levels:
        top = best_level(system, c)
        if top is not None:
            service[str(c)] = {"throughput": top.level.throughput,
                               "throughput_all": [r.level.throughput for r in system.levels[c]],
                               "p50_ms": top.level.latency_ms["p50"],
                               "p99_ms": top.level.latency_ms["p99"],
                               "server_cpu_ms_per_query": top.server_cpu_ms_per_query,
                               "errors": top.level.errors}
    return {"name": system.name, "variant": str(system.variant) if system.variant else None,
            "raw_sweep": [vars(r) for r in system.sweep],
            "raw_best": vars(best) if best else None, "service": service, **system.agreement}


def report(args: argparse.Namespace, systems: list[System], peer: System | None,
           queries: list[Query], loads: list[float]) -> None:
    torch_raw = max(r.throughput for r in systems[0].raws)
    print(f"\nbest of {args.repeats} rounds; {len(queries)} requests per level "
          f"({args.c1_requests} at concurrency 1); load average {min(loads):.2f}-{max(loads):.2f}")
    print(f"raw = Embedder.encode q/s at the runtime's best batch; x{systems[0].name} = raw / "
          f"{systems[0].name}'s raw; service = rankd /rank (embed, exact top-{args.top_k}, JSON)"
          + ("; peer = infinity-emb /embeddings (embed only)" if peer else "") + "\n")
    levels = args.concurrency
    header = (f"{'runtime':<28} {'raw q/s':>8} {'batch':>5} {'x' + systems[0].name:>7} "
              + " ".join(f"{'c' + str(c) + ' q/s':>9}" for c in levels)
              + f" {'same top-k':>10} {'same order':>10} {'MAP@' + str(args.top_k):>8}")
    print(header)
    print("-" * len(header))
    for system in [*systems, *([peer] if peer else [])]:
        if system.raws:
            raw = max(system.raws, key=lambda r: r.throughput)
            cells = f"{raw.throughput:>8.1f} {raw.batch_size:>5} {raw.throughput / torch_raw:>7.2f}"
        else:
            cells = f"{'-':>8} {'-':>5} {'-':>7}"
        service = " ".join(
            f"{(top.level.throughput if (top := best_level(system, c)) else 0):>9.1f}"
            for c in levels)
        figures = system.agreement
        quality = (f"{figures['top_k_same_set']:>10.3f} {figures['top_k_same_order']:>10.3f} "
                   f"{figures.get('map', float('nan')):>8.4f}" if figures else "")
        print(f"{system.name:<28} {cells} {service} {quality}")
    if peer is not None:
        print()
        for c in levels:
            theirs = best_level(peer, c)
            if theirs is None or not theirs.level.throughput:
                continue
            ratios = ", ".join(
                f"{s.name} {top.level.throughput / theirs.level.throughput:.2f}x"
                for s in systems if (top := best_level(s, c)) is not None)
            print(f"rankd / infinity at concurrency {c}: {ratios}")
    errors = {s.name: {k: v for results in s.levels.values() for r in results
                       for k, v in r.level.errors.items()}
              for s in [*systems, *([peer] if peer else [])]}
    if any(errors.values()):
        print(f"errors: { {k: v for k, v in errors.items() if v} }")


if __name__ == "__main__":
    sys.exit(main())
