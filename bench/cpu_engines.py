"""Where the time of a rerank goes, and the CPU engines side by side on the same prompts.

Each Eedi query (a seeded sample of ``--limit`` from ``--queries``, by default the whole
train.csv; give a pipeline's ``test.csv`` to score questions nothing chose on) gets the MiniLM
retriever's top ``--candidates`` (exact FAISS), sent as the documents of a ``/v1/rerank``.
Query by query, in turn so that load falls on all alike:

1. **The breakdown.** The request over HTTP to the real app (uvicorn on a loopback port, as
   ``rankd serve`` runs it); the same request to the engine in process (``Engine.rerank``: the
   rendering on the tokenizer thread, the batcher's queue, the passes, the merge); and the
   engine's bare passes over the prompts that request rendered (the backend's ``score_batch``
   on their token ids, prefix sharing on). HTTP over the bare passes is the service's
   overhead. ``--profile N`` adds torch's profiler over the first N queries' bare passes, by
   operator: the linear layers, attention, the element-wise rest (its top operators); and the
   roofline: the linear layers' FLOPs per query (the profiler's count), their rate in the
   passes, and a large float32 matrix product's rate on the same threads, whose quotient is
   the linear layers' floor on this CPU.
2. **The engines** on those token ids, each one whole pass per query: rankd's transformers path
   in float32 (with prefix sharing, and without it: the same work as the peers), bfloat16 and
   int8 (dynamic, ``RANKD_RERANKER_QUANTIZATION``); rankd's openvino backend
   (``RANKD_RERANKER_BACKEND=openvino``: the same passes, prefix sharing included, on OpenVINO,
   in the dtype ``auto`` chooses); and OpenVINO as a plain peer
   (``openvino.convert_model`` of the same weights; f32, bf16 where the CPU computes it, and
   int8 weights by NNCF), whole prompts left-padded, no prefix sharing. Per engine: the median
   time of a query's passes, speed against rankd's float32, the largest difference of a label
   probability and the top-1 agreement with float32, and MAP@25 of the reranker alone (its
   scores over the candidates, retrieval's order below them).

The host's CPU, its flags, the threads and the load are printed with the figures; the figures
so far go to stderr every ``--progress-every`` queries, so that a long run stopped early keeps
them.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/cpu_engines.py --data ../shared/data/eedi \\
        --limit 300 [--model RUN/reranker --scoring pointwise]

A benchmark, not a test: run it alone on a quiet machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from reranker import ListwiseScorer, RerankerConfig
from reranker.backends.base import LabelRead
from reranker.listwise import order_evidence, order_permutations, renormalise
from reranker.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name
from retriever.evaluation import average_precision

ENGINES = ["rankd-float32", "rankd-float32-unshared", "rankd-bfloat16", "rankd-int8",
           "rankd-openvino", "openvino-f32", "openvino-bf16", "openvino-int8-weights"]
OP_GROUPS = {"linear": ("aten::mm", "aten::addmm", "aten::bmm"),
             "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::scaled_dot_product_attention")}


def _median_ms(samples: Sequence[float]) -> float:
    return round(statistics.median(samples) * 1000, 1)


class Recorder:
    """Wraps a backend's ``label_logprobs`` to keep the reads a request sent."""

    def __init__(self, backend: Any) -> None:
        self.reads: list[LabelRead] = []
        self._inner = backend.label_logprobs
        backend.label_logprobs = self

    async def __call__(self, reads: list[LabelRead]) -> list[list[float]]:
        self.reads = list(reads)
        return await self._inner(reads)


def openvino_model(model: Any) -> Any:
    """The transformers model converted by OpenVINO, taking whole left-padded prompts and
    giving the logits at each last position (as rankd's unshared pass computes them)."""
    import openvino as ov
    import torch

    class LastLogits(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            return self.inner(input_ids=input_ids, attention_mask=attention_mask,
                              position_ids=positions, logits_to_keep=1,
                              use_cache=False).logits[:, -1, :]

    example = torch.ones((2, 16), dtype=torch.long)
    return ov.convert_model(LastLogits(model).eval(),
                            example_input={"input_ids": example, "attention_mask": example})


def openvino_engine(converted: Any, hint: str, compress: bool,
                    threads: int) -> Callable[..., Any]:
    """A compiled copy of the converted model: ``hint`` its inference precision, ``compress``
    its weights int8 (NNCF: asymmetric, per channel)."""
    import openvino as ov
    import torch

    if compress:
        import nncf

        converted = nncf.compress_weights(converted.clone())
    compiled = ov.Core().compile_model(converted, "CPU", {
        "INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(reads: Sequence[LabelRead]) -> Any:
        width = max(len(r.prompt_token_ids) for r in reads)
        ids = np.zeros((len(reads), width), dtype=np.int64)
        mask = np.zeros((len(reads), width), dtype=np.int64)
        for row, read in enumerate(reads):
            ids[row, width - len(read.prompt_token_ids):] = read.prompt_token_ids
            mask[row, width - len(read.prompt_token_ids):] = 1
        out = request.infer({"input_ids": ids, "attention_mask": mask})
        return torch.from_numpy(np.asarray(next(iter(out.values())))).float()

    return run


@dataclass
class Record:
    """One query as the engines saw it: its reads, candidates, answer and float32's logprobs."""

    reads: list[LabelRead]
    ids: list[str]
    candidates: int
    relevant: list[str]
    float32: list[list[float]]


def llama_cpp_peers(args: argparse.Namespace, records: list[Record],
                    ) -> list[tuple[str, list[float], list[list[list[float]]]]]:
    """llama.cpp on the same token ids, in its own venv (bench/llama_cpp_peer.py), at the
    shipped Q4_1 and at each ``--gguf-types`` quantized from it; unshared and shared."""
    from reranker.models import embedded_gguf

    work = Path(tempfile.mkdtemp(prefix="rankd-llama-"))
    reads = work / "reads.json"
    reads.write_text(json.dumps([[{"prompt": r.prompt_token_ids, "labels": r.label_token_ids}
                                  for r in record.reads] for record in records]))
    peer = str(Path(__file__).with_name("llama_cpp_peer.py"))
    files = {"Q4_1": embedded_gguf()}
    for kind in args.gguf_types:
        files[kind] = work / f"smollm2-{kind}.gguf"
        subprocess.run([args.llama_python, peer, "--quantize", str(files["Q4_1"]),
                        str(files[kind]), kind], check=True, capture_output=True)
    out = []
    for kind, path in files.items():
        result = work / f"{kind}.json"
        subprocess.run([args.llama_python, peer, "--model", str(path), "--reads", str(reads),
                        "--threads", str(args.threads), "--out", str(result)], check=True)
        report = json.loads(result.read_text())
        for mode in ("unshared", "shared"):
            out.append((f"llama.cpp-{kind}-{mode}", [q["seconds"] for q in report[mode]],
                        [q["logprobs"] for q in report[mode]]))
    return out


def gemm_gflops(torch: Any, threads: int, size: int = 1536, seconds: float = 3.0) -> float:
    """A large float32 matrix product's rate on this CPU and these threads: the best of a few
    seconds of repeats, after a warm-up, as GFLOP/s."""
    torch.set_num_threads(threads)
    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)
    best = float("inf")
    stop = time.perf_counter() + seconds
    while time.perf_counter() < stop:
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def scores_of(logprobs: Sequence[Sequence[float]], n: int, pointwise: bool) -> list[float]:
    """A query's candidate scores from its reads' label logprobs, as the scorer forms them."""
    if pointwise:
        return [renormalise(row)[0] for row in logprobs]
    permutations = order_permutations(n, len(logprobs))
    means, *_ = order_evidence(n, permutations, [renormalise(row) for row in logprobs])
    return list(means)


def eedi_sample(args: argparse.Namespace) -> tuple[Any, list[Any], list[Any], np.ndarray]:
    """The embedded MiniLM, the Eedi catalogue, a seeded sample of ``--limit`` queries from
    ``--queries`` (default DATA/train.csv) and their similarity to every entry."""
    from retriever import Embedder, read_catalog
    from retriever.eedi import eedi_queries

    entries = read_catalog(args.data / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    queries = eedi_queries(args.queries or args.data / "train.csv")
    queries = random.Random(args.seed).sample(queries, min(args.limit, len(queries)))
    embedder = Embedder.load("default", device="cpu")
    catalogue = embedder.encode([e.text for e in entries])
    return embedder, entries, queries, embedder.encode([q.text for q in queries]) @ catalogue.T


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    from rankd.devtools.serving import serve_in_thread
    from reranker.backends.transformers_backend import label_log_softmax
    from retriever.sample import build_sample_collection
    from service.engine import Engine
    from service.protocol import RerankRequest
    from service.settings import Settings

    embedder, entries, queries, similarity = eedi_sample(args)
    threads = torch.get_num_threads()
    flags = cpu_flags()
    native_bf16 = any(f in flags for f in NATIVE_BF16_FLAGS)
    engines = [e for e in args.engines if native_bf16 or not ("bf16" in e or "bfloat16" in e)]

    index_dir = Path(tempfile.mkdtemp(prefix="rankd-cpu-engines-"))
    build_sample_collection(embedder, index_dir)
    reranker = {"backend": args.backend, "model": args.model,
                "dtype": "float32" if args.backend == "transformers" else "auto",
                "scoring": args.scoring, "batch_wait_ms": 0.0}
    settings = Settings(index_dir=index_dir, device="cpu", log_level="warning",
                        reranker=reranker, max_rerank_documents=max(args.candidates, 100))
    engine = await Engine.start(settings)
    scorer = engine.scorer
    assert scorer is not None
    reference: Any = scorer.backend  # the transformers backend: its bare passes are timed
    recorder = Recorder(reference)
    others: dict[str, Any] = {}  # the other rankd variants: a scorer each, for its backend
    for name, extra in (("rankd-float32-unshared", {"prefix_sharing": False}),
                        ("rankd-openvino", {"backend": "openvino", "dtype": "auto"}),
                        ("rankd-bfloat16", {"dtype": "bfloat16"}),
                        ("rankd-int8", {"quantization": "int8"})):
        if name in engines:
            others[name] = await ListwiseScorer.create(RerankerConfig(**{**reranker, **extra}))
    openvino: dict[str, Callable[..., Any]] = {}
    converted = openvino_model(reference.model) if any("openvino" in e for e in engines) else None
    for name, hint, compress in (("openvino-f32", "f32", False), ("openvino-bf16", "bf16", False),
                                 ("openvino-int8-weights", "f32", True)):
        if name in engines:
            openvino[name] = openvino_engine(converted, hint, compress, threads)

    timings: dict[str, list[float]] = {k: [] for k in ("http", "engine", "passes")}
    engine_ms: dict[str, list[float]] = {e: [] for e in engines}
    aps: dict[str, list[float]] = {"retrieval": []}
    top1: dict[str, list[bool]] = {}
    largest: dict[str, float] = {}
    profiled: dict[str, float] = {}
    flops: dict[str, int] = {}  # the profiler's count, where it counts (the matrix products)
    others_ms: dict[str, float] = {}  # the element-wise rest, by operator
    pointwise = args.scoring == "pointwise"

    records: list[Record] = []

    def judge(name: str, record: Record, logprobs: list[list[float]]) -> None:
        """An engine's MAP@25 on the query, and its agreement with rankd's float32."""
        scores = scores_of(logprobs, record.candidates, pointwise)
        order = sorted(range(record.candidates), key=lambda i: -scores[i])
        aps.setdefault(name, []).append(average_precision(
            [record.ids[i] for i in order] + record.ids[record.candidates:], record.relevant,
            25))
        if name == "rankd-float32":
            return
        base = [renormalise(r) for r in record.float32]
        other = [renormalise(r) for r in logprobs]
        top1.setdefault(name, []).extend(int(np.argmax(a)) == int(np.argmax(b))
                                         for a, b in zip(base, other, strict=True))
        largest[name] = max(largest.get(name, 0.0), *(
            abs(x - y) for a, b in zip(base, other, strict=True)
            for x, y in zip(a, b, strict=True)))

    def bare(backend: Any, reads: list[LabelRead]) -> list[list[float]]:
        with torch.inference_mode(), backend._autocast():
            return [row.tolist() for row in label_log_softmax(backend.last_logits(reads), reads)]

    try:
        with serve_in_thread(settings) as url:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                for n, (query, row) in enumerate(zip(queries, similarity, strict=True)):
                    ranked = row.argsort()[::-1]
                    head = [int(i) for i in ranked[: args.candidates]]
                    documents = [entries[i].text for i in head]
                    body = {"query": query.text, "documents": documents}
                    started = time.perf_counter()
                    response = await client.post("/v1/rerank", json=body)
                    response.raise_for_status()
                    timings["http"].append(time.perf_counter() - started)
                    started = time.perf_counter()
                    await engine.rerank(RerankRequest(query=query.text, documents=documents))
                    timings["engine"].append(time.perf_counter() - started)
                    reads = recorder.reads
                    started = time.perf_counter()
                    reference.score_batch(reads)
                    timings["passes"].append(time.perf_counter() - started)
                    if n < args.profile:
                        from torch.profiler import ProfilerActivity, profile

                        with profile(activities=[ProfilerActivity.CPU],
                                     with_flops=True) as prof:
                            reference.score_batch(reads)
                        for event in prof.key_averages():
                            group = next((g for g, names in OP_GROUPS.items()
                                          if event.key in names), "other aten")
                            if event.key.startswith("aten::"):
                                profiled[group] = (profiled.get(group, 0.0)
                                                   + event.self_cpu_time_total / 1e3)
                                flops[group] = flops.get(group, 0) + (event.flops or 0)
                                if group == "other aten":
                                    others_ms[event.key] = (others_ms.get(event.key, 0.0)
                                                            + event.self_cpu_time_total / 1e3)
                    relevant = [query.misconception_id or ""]
                    ids = [entries[i].id for i in ranked[:25]]
                    aps["retrieval"].append(average_precision(ids, relevant, 25))
                    results: dict[str, list[list[float]]] = {}
                    for name in engines[n % len(engines):] + engines[: n % len(engines)]:
                        started = time.perf_counter()
                        if name == "rankd-float32":
                            results[name] = bare(reference, reads)
                        elif name in others:
                            results[name] = bare(others[name].backend, reads)
                        else:
                            last = openvino[name](reads)
                            results[name] = [r.tolist() for r in label_log_softmax(last, reads)]
                        engine_ms[name].append(time.perf_counter() - started)
                    record = Record(reads, ids, len(head), relevant, results["rankd-float32"])
                    records.append(record)
                    for name, logprobs in results.items():
                        judge(name, record, logprobs)
                    if (n + 1) % args.progress_every == 0:
                        # The figures so far, on stderr: a long run that is stopped keeps them.
                        print(json.dumps({
                            "queries_done": n + 1,
                            "breakdown_median_ms": {k: _median_ms(v) for k, v in timings.items()},
                            "engine_median_ms": {k: _median_ms(v) for k, v in engine_ms.items()},
                            "map@25": {k: round(statistics.fmean(v), 4) for k, v in aps.items()},
                        }), file=sys.stderr, flush=True)
    finally:
        for other in others.values():
            await other.close()
        await engine.close()
    if args.llama_python:
        for name, seconds, per_query in llama_cpp_peers(args, records):
            engine_ms[name] = seconds
            for done, rows in zip(records, per_query, strict=True):
                judge(name, done, rows)
    passes = statistics.median(timings["passes"])
    float32 = statistics.median(engine_ms["rankd-float32"])
    profiled_queries = max(1, min(args.profile, len(queries)))
    roofline: dict[str, float] = {}
    if flops.get("linear"):
        # How near the passes run to what this CPU's matrix units do: the linear layers' FLOPs
        # per query (the profiler counts them), their rate in the passes, and a large float32
        # GEMM's rate on the same threads. Their quotient is the floor of the linear layers.
        linear_gflop = flops["linear"] / profiled_queries / 1e9
        peak = gemm_gflops(torch, threads)
        roofline = {
            "linear_gflop_per_query": round(linear_gflop, 1),
            "linear_gflops_in_passes": round(
                linear_gflop / (profiled["linear"] / profiled_queries / 1e3), 1),
            "gemm_float32_peak_gflops": round(peak, 1),
            "linear_floor_ms_at_gemm_peak": round(linear_gflop / peak * 1e3),
        }
    return {
        "cpu": cpu_model_name(), "native_bf16_flags": sorted(f for f in NATIVE_BF16_FLAGS
                                                             if f in flags),
        "avx512f": "avx512f" in flags, "torch_threads": threads, "model": args.model,
        "backend": args.backend,
        "scoring": args.scoring, "queries": len(queries), "candidates": args.candidates,
        "breakdown_median_ms": {k: _median_ms(v) for k, v in timings.items()},
        "service_over_bare_passes": round(statistics.median(timings["http"]) / passes, 3),
        "engine_over_bare_passes": round(statistics.median(timings["engine"]) / passes, 3),
        "profiled_ms_per_query": {k: round(v / profiled_queries, 1)
                                  for k, v in sorted(profiled.items())},
        "roofline": roofline,
        "profiled_other_ops_ms_per_query": {
            k: round(v / profiled_queries, 1)
            for k, v in sorted(others_ms.items(), key=lambda kv: -kv[1])[:8]},
        "engine_median_ms": {k: _median_ms(v) for k, v in engine_ms.items()},
        "speed_against_rankd_float32": {k: round(float32 / statistics.median(v), 2)
                                        for k, v in engine_ms.items()},
        "top1_agreement_with_float32": {k: round(statistics.fmean(v), 4)
                                        for k, v in top1.items()},
        "largest_probability_difference": {k: round(v, 4) for k, v in largest.items()},
        "map@25": {k: round(statistics.fmean(v), 4) for k, v in aps.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eedi"))
    parser.add_argument("--queries", type=Path, help="an Eedi CSV (default: DATA/train.csv)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scoring", choices=["listwise", "pointwise"], default="listwise")
    parser.add_argument("--backend", choices=["transformers", "openvino"], default="transformers",
                        help="the served backend of the breakdown, and the reference engine "
                             "(run each alone: engines run in turn share the CPU's thread "
                             "pools, and a pool still spinning from the last engine slows the "
                             "next)")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--limit", type=int, default=300, help="queries")
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=ENGINES,
                        help="rankd-float32 always runs, as the reference; the bf16 ones "
                             "only where the CPU computes bf16")
    parser.add_argument("--profile", type=int, default=5,
                        help="profile the bare passes of the first N queries")
    parser.add_argument("--llama-python", help="llama.cpp's venv python "
                        "(scripts/setup_llama_cpp.sh prints it): add llama.cpp as a peer")
    parser.add_argument("--gguf-types", nargs="*", default=["Q8_0", "Q4_K_M"],
                        choices=["Q8_0", "Q4_K_M"],
                        help="llama.cpp types quantized from the shipped Q4_1, beside it")
    parser.add_argument("--threads", type=int, default=0,
                        help="threads for every engine (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--progress-every", type=int, default=25,
                        help="print the figures so far to stderr every N queries")
    args = parser.parse_args(argv)
    if "rankd-float32" not in args.engines:
        args.engines = ["rankd-float32", *args.engines]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    else:
        import torch

        args.threads = torch.get_num_threads()
    load_before = os.getloadavg()
    report = asyncio.run(main_async(args))
    report["load_average_before"] = load_before
    report["load_average_after"] = os.getloadavg()
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
