"""How much of a rerank's pass shapes is padding: for each Eedi query's top 10 sent as a
``/v1/rerank`` to the engine, the prompt tokens its passes compute with prefix sharing (each
shared prefix once, each suffix padded to the longest of its pass) against the real ones.

The reads are rendered by the real engine (the embedded SmolLM2 or ``--model``, its prompts
and scoring); the passes themselves are not run, so this takes seconds. A micro-batch holds
about one query (``RANKD_RERANKER_BATCH_TOKENS``, 768), so the figure is a query's own:
pointwise, its candidates' suffixes differ in length; listwise, its orders do not.
``--pass-cost`` also times one forward pass of the model over 1 to 256 random tokens (median
of 7, after a warm-up), which says what a pass of its own costs against the padding it would
save.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/padding.py --data ../shared/data/eedi \\
        --queries RUN/reranker/test.csv --model RUN/reranker --scoring pointwise
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
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu_engines import Recorder, eedi_sample  # noqa: E402
from reranker.backends.base import LabelRead  # noqa: E402
from reranker.backends.transformers_backend import (  # noqa: E402
    _sharing_pays,
    shared_prefix_groups,
)
from reranker.precision import cpu_model_name  # noqa: E402


def pass_tokens(reads: list[LabelRead]) -> tuple[int, int]:
    """(real, computed) prompt tokens of one micro-batch's passes with prefix sharing."""
    prompts = [r.prompt_token_ids for r in reads]
    groups = shared_prefix_groups(prompts)
    shared = [g for g in groups if _sharing_pays(g, reads)]
    alone = [i for g in groups if not _sharing_pays(g, reads) for i in g[1]]
    real = computed = 0
    if alone:
        lengths = [len(prompts[i]) for i in alone]
        real += sum(lengths)
        computed += max(lengths) * len(lengths)
    if shared:
        prefixes = [length for length, _ in shared]
        suffixes = [len(prompts[i]) - length for length, members in shared for i in members]
        real += sum(prefixes) + sum(suffixes)
        computed += max(prefixes) * len(prefixes) + max(suffixes) * len(suffixes)
    return real, computed


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from retriever.sample import build_sample_collection
    from service.engine import Engine
    from service.protocol import RerankRequest
    from service.settings import Settings

    embedder, entries, queries, similarity = eedi_sample(args)
    index_dir = Path(tempfile.mkdtemp(prefix="rankd-padding-"))
    build_sample_collection(embedder, index_dir)
    settings = Settings(index_dir=index_dir, device="cpu", log_level="warning",
                        reranker={"model": args.model, "scoring": args.scoring,
                                  "dtype": "float32", "batch_wait_ms": 0.0})
    engine = await Engine.start(settings)
    assert engine.scorer is not None
    recorder = Recorder(engine.scorer.backend)

    async def rendered_only(reads: list[LabelRead]) -> list[list[float]]:
        return [[0.0] * len(r.label_token_ids) for r in reads]

    recorder._inner = rendered_only  # the reads as the engine renders them, not their passes
    pass_ms: dict[int, float] = {}
    if args.pass_cost:
        backend: Any = engine.scorer.backend  # the transformers backend: its torch model
        pass_ms = await asyncio.to_thread(time_passes, backend.model)
    shares: list[float] = []
    real_total = computed_total = 0
    try:
        for query, row in zip(queries, similarity, strict=True):
            documents = [entries[i].text for i in row.argsort()[::-1][: args.candidates]]
            await engine.rerank(RerankRequest(query=query.text, documents=documents))
            real, computed = pass_tokens(recorder.reads)
            real_total += real
            computed_total += computed
            shares.append(1 - real / computed)
    finally:
        await engine.close()
    return {"model": args.model, "scoring": args.scoring, "queries": len(queries),
            "candidates": args.candidates,
            "real_tokens_per_query": round(real_total / len(queries)),
            "computed_tokens_per_query": round(computed_total / len(queries)),
            "padding_share": round(1 - real_total / computed_total, 3),
            "padding_share_median_query": round(statistics.median(shares), 3),
            "pass_ms_by_tokens": pass_ms}


def time_passes(model: Any, sizes: tuple[int, ...] = (1, 8, 32, 64, 128, 256),
                repeats: int = 7) -> dict[int, float]:
    """The median time of one forward pass over ``n`` random tokens, for each ``n``."""
    import torch

    times: dict[int, float] = {}
    with torch.inference_mode():
        for n in sizes:
            ids = torch.randint(100, 20000, (1, n))
            model(input_ids=ids, logits_to_keep=1)
            samples = []
            for _ in range(repeats):
                started = time.perf_counter()
                model(input_ids=ids, logits_to_keep=1)
                samples.append(time.perf_counter() - started)
            times[n] = round(statistics.median(samples) * 1000, 1)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/eedi"))
    parser.add_argument("--queries", type=Path, help="an Eedi CSV (default: DATA/train.csv)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--scoring", choices=["listwise", "pointwise"], default="listwise")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pass-cost", action="store_true",
                        help="also time one pass over 1 to 256 tokens (run it alone)")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    report["cpu"] = cpu_model_name()
    report["load_average"] = os.getloadavg()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
