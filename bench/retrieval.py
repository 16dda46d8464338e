"""Retrieval benchmark: the service's throughput over HTTP against the raw encoder's, in one run.

1. Raw: sentence-transformers ``encode`` of the query set in this process, once at each batch
   size of ``--batch-sizes``; the fastest batch size is the reference.
2. Service: ``rankd serve`` in a child process on a loopback port, rerank off, driven by the
   load-test harness's closed loop (clients/loadtest.py) at each ``--concurrency`` level, each
   level sending the query set once.
3. ``--repeats`` rounds of (one raw pass at the reference batch size, every service level),
   interleaved so that both see the same background load; the best of each is kept.
4. It prints service/raw throughput at each level with p50/p99 latency, the mean encoder batch
   (from /metrics) and the CPU time per query of the server, of this process as load generator,
   and of the raw encoder.

    python bench/retrieval.py --input ../shared/data/eedi/train.csv --format eedi \\
        --catalog ../shared/data/eedi/misconception_mapping.csv \\
        --id-column MisconceptionId --text-column MisconceptionName

Without --input/--catalog it uses the sample catalogue and its query set (cycled to --size). A
benchmark, not a test: the numbers depend on the machine and on what else runs on it (the load
average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from clients.api import RankOptions
from clients.loadtest import LevelResult, LoadConfig, run_loadtest
from clients.queries import Query, QueryFileOptions, read_queries, sample_queries

if TYPE_CHECKING:
    from retriever import Embedder


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
    return [Query(f"{base[i % len(base)].id}#{i // len(base)}", base[i % len(base)].text)
            for i in range(size)]


def build_index(args: argparse.Namespace, model: str, workdir: Path) -> tuple[Path, str]:
    """An index dir holding the benchmark's collection; reuses --index-dir when given."""
    from retriever import Embedder, build_collection, read_catalog
    from retriever.data import (
        SAMPLE_COLLECTION,
        SAMPLE_ID_COLUMN,
        SAMPLE_TEXT_COLUMN,
        sample_catalog_path,
    )

    if args.index_dir is not None:
        return Path(args.index_dir), args.collection
    if args.catalog is None:
        catalog, id_column, text_column = (sample_catalog_path(), SAMPLE_ID_COLUMN,
                                           SAMPLE_TEXT_COLUMN)
        collection = SAMPLE_COLLECTION
    else:
        catalog, id_column, text_column = Path(args.catalog), args.id_column, args.text_column
        collection = args.collection
    index_dir = workdir / "index"
    entries = read_catalog(catalog, id_column, text_column)
    build_collection(entries, Embedder.load(model, device=args.device), index_dir, collection,
                     show_progress=False)
    return index_dir, collection


def raw_pass(embedder: Embedder, texts: list[str], batch_size: int) -> RawResult:
    """Encode every text once, as the library would, at ``batch_size``."""
    started, cpu_started = time.perf_counter(), time.process_time()
    embedder.model.encode(texts, batch_size=batch_size, normalize_embeddings=True,
                          convert_to_numpy=True, show_progress_bar=False)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    return RawResult(batch_size, seconds, len(texts) / seconds, 1000 * cpu / len(texts))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_service(index_dir: Path, port: int, model: str, device: str,
                  extra_env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    env = {**os.environ, "RANKD_INDEX_DIR": str(index_dir), "RANKD_EMBEDDER_MODEL": model,
           "RANKD_DEVICE": device, "RANKD_RERANKER_BACKEND": "none",
           "RANKD_LOG_LEVEL": "warning", **extra_env}
    process = subprocess.Popen(
        [sys.executable, "-m", "rankd.cli", "serve", "--host", "127.0.0.1", "--port",
         str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("rankd serve exited: "
                               + (process.stderr.read().decode() if process.stderr else ""))
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.terminate()
    raise RuntimeError("rankd serve did not become ready within 300 s")


def stop_service(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def service_level(url: str, server_pid: int, queries: list[Query], concurrency: int,
                  requests: int, rank: RankOptions) -> ServiceResult:
    """One closed-loop level, with the CPU time both processes spent on it."""
    config = LoadConfig(url=url, rank=rank, concurrency=(concurrency,), requests=requests,
                        warmup=0, timeout_s=120.0)
    server_before, client_before = process_cpu_seconds(server_pid), time.process_time()
    (level,) = asyncio.run(run_loadtest(queries, config)).levels
    server_after, client_after = process_cpu_seconds(server_pid), time.process_time()
    server_cpu = (None if server_before is None or server_after is None
                  else 1000 * (server_after - server_before) / level.requests)
    return ServiceResult(level, server_cpu, 1000 * (client_after - client_before) / level.requests)


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
    parser.add_argument("--index-dir", help="an existing index dir holding --collection")
    parser.add_argument("--model", default="sentence-transformers/all-MiniLM-L6-v2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=_ints, default=[4, 8, 16, 32, 64, 128])
    parser.add_argument("--concurrency", type=_ints, default=[1, 16, 64])
    parser.add_argument("--c1-requests", type=int, default=128,
                        help="requests at concurrency 1 (latency-bound and slow; default 128)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of (raw pass, every service level); the best of each is "
                             "kept (default 3)")
    parser.add_argument("--top-k", type=int, default=25)
    parser.add_argument("--torch-threads", type=int,
                        help="intra-op threads of torch, for the raw encoder and the service "
                             "alike (OMP_NUM_THREADS there); default: torch's own choice")
    parser.add_argument("--env", action="append", default=[], metavar="RANKD_X=VALUE",
                        help="extra settings for the service (repeatable)")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from retriever import Embedder

    extra_env = dict(item.split("=", 1) for item in args.env)
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
        extra_env.update(OMP_NUM_THREADS=str(args.torch_threads),
                         MKL_NUM_THREADS=str(args.torch_threads))
    queries = load_queries(args)
    texts = [q.text for q in queries]
    print(f"{len(queries)} queries; {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    raws: list[RawResult] = []
    levels: dict[int, list[ServiceResult]] = {c: [] for c in args.concurrency}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="rankd-bench-") as tmp:
        index_dir, collection = build_index(args, args.model, Path(tmp))
        rank = RankOptions(top_k=args.top_k, rerank=False, collection=collection)
        embedder = Embedder.load(args.model, device=args.device)
        raw_pass(embedder, texts[:64], 32)  # warm-up
        sweep = [raw_pass(embedder, texts, b) for b in args.batch_sizes]
        for r in sweep:
            print(f"  raw encode, batch {r.batch_size:>4}: {r.throughput:8.1f} q/s", flush=True)
        best_batch = max(sweep, key=lambda r: r.throughput).batch_size
        process, url = start_service(index_dir, free_port(), args.model, args.device,
                                     extra_env)
        try:
            service_level(url, process.pid, queries, 4, 64, rank)  # warm-up
            for round_no in range(1, args.repeats + 1):
                raw = raw_pass(embedder, texts, best_batch)
                raws.append(raw)
                line = [f"round {round_no}: raw {raw.throughput:.1f}"]
                for c in args.concurrency:
                    requests = args.c1_requests if c == 1 else len(queries)
                    result = service_level(url, process.pid, queries, c, requests, rank)
                    levels[c].append(result)
                    line.append(f"c{c} {result.level.throughput:.1f}")
                loads.append(os.getloadavg()[0])
                print("  " + ", ".join(line) + f" q/s; load average {loads[-1]:.2f}",
                      flush=True)
        finally:
            stop_service(process)

    best = max(raws, key=lambda r: r.throughput)
    print(f"\nraw encoder: best batch size {best.batch_size}; best of {len(raws)} passes "
          f"{best.throughput:.1f} q/s (all: {', '.join(f'{r.throughput:.1f}' for r in raws)}); "
          f"{min(r.cpu_ms_per_query for r in raws):.2f} CPU ms/query")
    print(f"service: rerank off, top_k {args.top_k}, {len(queries)} requests per level "
          f"({args.c1_requests} at concurrency 1), best of {args.repeats} rounds; "
          f"load average {min(loads):.2f}-{max(loads):.2f}")
    print("ratio = service q/s / raw q/s (best against best); cpu ratio = raw CPU ms/query / "
          "server CPU ms/query (lowest of each)\n")
    header = (f"{'concurrency':>11}  {'service q/s':>11}  {'ratio':>6}  {'p50 ms':>8}  "
              f"{'p99 ms':>8}  {'enc batch':>9}  {'server CPU ms/q':>15}  {'cpu ratio':>9}  "
              f"{'client CPU ms/q':>15}  errors")
    print(header)
    print("-" * len(header))
    rows: list[dict[str, Any]] = []
    raw_cpu = min(r.cpu_ms_per_query for r in raws)
    for concurrency, results in levels.items():
        top = max(results, key=lambda r: r.level.throughput)
        level = top.level
        ratio = level.throughput / best.throughput
        batch = level.batch_mean.get("search")
        cpus = [r.server_cpu_ms_per_query for r in results if r.server_cpu_ms_per_query]
        server_cpu = min(cpus) if cpus else None
        cpu_ratio = raw_cpu / server_cpu if server_cpu else None
        client_cpu = min(r.client_cpu_ms_per_query for r in results)
        errors = {k: v for r in results for k, v in r.level.errors.items()}
        print(f"{concurrency:>11}  {level.throughput:>11.1f}  {ratio:>6.2f}  "
              f"{level.latency_ms['p50'] or 0:>8.1f}  {level.latency_ms['p99'] or 0:>8.1f}  "
              f"{batch or 0:>9.1f}  {server_cpu or 0:>15.2f}  {cpu_ratio or 0:>9.2f}  "
              f"{client_cpu:>15.2f}  {errors or '-'}")
        rows.append({"concurrency": concurrency, "throughput": level.throughput,
                     "throughput_all": [r.level.throughput for r in results],
                     "ratio": ratio, "p50_ms": level.latency_ms["p50"],
                     "p99_ms": level.latency_ms["p99"], "encoder_batch_mean": batch,
                     "server_cpu_ms_per_query": server_cpu, "cpu_ratio": cpu_ratio,
                     "client_cpu_ms_per_query": client_cpu, "errors": errors})
    if args.json is not None:
        args.json.write_text(json.dumps({
            "queries": len(queries), "raw_sweep": [vars(r) for r in sweep],
            "raw": [vars(r) for r in raws], "raw_best": vars(best), "service": rows,
            "top_k": args.top_k, "torch_threads": torch.get_num_threads(),
            "load_average": loads}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
