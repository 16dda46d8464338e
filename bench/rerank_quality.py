"""What the reranker does to ranking quality, and how much it leans on position, on Eedi.

The real app (create_app, its lifespan, the ASGI routes) serves the Eedi catalogue with the
embedder and the reranker that the settings name (default: MiniLM and the embedded SmolLM2, in
process). Every query goes through ``POST /rank`` with ``debug: true``; the scored orders it
returns (their label positions and probabilities) are combined into each scheme with the
reranker's own functions (``order_evidence``, ``fuse``), so every scheme is judged on the same
queries and the same top-N candidates:

- retrieval only; forward order only; reverse order only; the two orders averaged;
- ``k`` cyclic rotations averaged (a second pass with ``orders: k`` on a subset);
- reciprocal-rank and linear fusion of the retrieval order with the averaged (and forward)
  scores, at several retrieval weights.

Reported per scheme: MAP@25 and recall@1/5/10/25 (the evaluator of ``rankd eval``), and the
rerank latency per query (the app's ``timings_ms.rerank``) for each order scheme. Position bias:
the share of queries whose most probable label is "A", the mean probability by label position,
and the mean gap between a candidate's probabilities in the two orders.

Run from the repository root on a quiet machine (figures in docs/experiments.md,
"Rerank quality"):

    HF_HUB_OFFLINE=1 .venv/bin/python bench/rerank_quality.py --data ../shared/data/eedi \\
        --candidates 10 --limit 600 --rotations 10 --rotation-limit 60 --json /tmp/rq10.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EEDI_INSTRUCTION = ("A student answered a maths question incorrectly. Choose the misconception "
                    "that explains the incorrect answer.")
MAP_K = 25
WEIGHTS = (0.25, 0.5, 0.75, 0.9)


def build_index(data: Path, index_dir: Path, embedder_model: str) -> None:
    from retriever import Embedder, build_collection, read_catalog

    if (index_dir / "eedi" / "manifest.json").is_file():
        return
    entries = read_catalog(data / "misconception_mapping.csv", "MisconceptionId",
                           "MisconceptionName")
    build_collection(entries, Embedder.load(embedder_model), index_dir, "eedi",
                     instruction=EEDI_INSTRUCTION, show_progress=False)


class Rankings:
    """One scheme's ranked ids per query."""

    def __init__(self) -> None:
        self.ranked: dict[str, list[str]] = {}

    def metrics(self, labels: dict[str, list[str]]) -> dict[str, float]:
        from retriever.evaluation import average_precision, recall

        ids = list(self.ranked)
        out = {"MAP@25": statistics.fmean(average_precision(self.ranked[i], labels[i], MAP_K)
                                          for i in ids)}
        for k in (1, 5, 10, 25):
            out[f"recall@{k}"] = statistics.fmean(recall(self.ranked[i], labels[i], k)
                                                  for i in ids)
        return out


def _order_by(head: Sequence[str], scores: Sequence[float]) -> list[str]:
    return [head[i] for i in sorted(range(len(head)), key=lambda i: -scores[i])]  # stable


def schemes_of(body: dict[str, Any], n: int) -> dict[str, list[str]]:
    """Every scheme's ranking of one /rank answer (debug on, retrieval order recoverable)."""
    from reranker.fusion import Fusion, Scores, fuse
    from reranker.listwise import order_evidence

    results = body["results"]
    orders = body["debug"]["orders"]
    # The forward order is the retrieval order; the candidates beyond N follow in it.
    assert orders[0]["positions"] == list(range(n))
    head = orders[0]["candidate_ids"]
    tail = [r["id"] for r in results[n:]]
    ids = head + tail
    score_of = {r["id"]: r["retrieval_score"] for r in results}
    retrieval_scores = [score_of[c] for c in head]
    perms = [o["positions"] for o in orders]
    probs = [o["probabilities"] for o in orders]

    def evidence_of(which: Sequence[int]) -> Scores:
        chosen_perms, chosen_probs = [perms[i] for i in which], [probs[i] for i in which]
        means, _, least, agreement = order_evidence(n, chosen_perms, chosen_probs)
        return Scores(means, least, agreement)

    out = {"retrieval only": ids}
    if len(orders) == 2:
        combos = {"forward only": evidence_of([0]), "reverse only": evidence_of([1]),
                  "two orders averaged": evidence_of([0, 1])}
    else:
        combos = {f"{len(orders)} rotations averaged": evidence_of(range(len(orders)))}
    for name, evidence in combos.items():
        out[name] = _order_by(head, evidence.probabilities) + tail
        if name == "reverse only":
            continue
        for fusion in (Fusion.RRF, Fusion.LINEAR, Fusion.CONSENSUS):
            if fusion is Fusion.CONSENSUS and evidence.agreement is None:
                continue
            for w in WEIGHTS:
                fused = fuse(retrieval_scores, evidence, fusion, w)
                out[f"{fusion.value} w={w} + {name}"] = [head[i] for i in fused.order] + tail
    return out


def bias_of(bodies: Sequence[dict[str, Any]], n: int) -> dict[str, Any]:
    """Position bias of the forward and reverse orders of two-order answers."""
    by_position = [[0.0] * n, [0.0] * n]
    top_a = [0, 0]
    gaps: list[float] = []
    for body in bodies:
        forward, reverse = body["debug"]["orders"]
        for o, order in enumerate((forward, reverse)):
            p = order["probabilities"]
            for j in range(n):
                by_position[o][j] += p[j] / len(bodies)
            top_a[o] += max(range(n), key=p.__getitem__) == 0
        # The same candidate at label j forward sits at label n-1-j in reverse.
        gaps += [abs(forward["probabilities"][j] - reverse["probabilities"][n - 1 - j])
                 for j in range(n)]
    return {"share_top_label_A": {"forward": top_a[0] / len(bodies),
                                  "reverse": top_a[1] / len(bodies)},
            "mean_probability_by_label": {"forward": [round(x, 4) for x in by_position[0]],
                                          "reverse": [round(x, 4) for x in by_position[1]]},
            "mean_gap_between_orders": statistics.fmean(gaps)}


def dump_scores(path: Path, bodies: Sequence[dict[str, Any]], queries: Sequence[Any], n: int,
                report: dict[str, Any]) -> None:
    """Each query's retrieval order and its orders' label probabilities, as JSON lines after a
    header: what bench/fusion_sweep.py judges every fusion on."""
    with path.open("w", encoding="utf-8") as out:
        out.write(json.dumps({"header": {k: report[k] for k in (
            "command", "queries", "candidates", "reranker", "embedder")}}) + "\n")
        for body, query in zip(bodies, queries, strict=True):
            orders = body["debug"]["orders"]
            head = orders[0]["candidate_ids"]
            score_of = {r["id"]: r["retrieval_score"] for r in body["results"]}
            out.write(json.dumps({
                "id": query.id, "question": query.question_id,
                "relevant": [str(query.misconception_id)],
                "head": head, "retrieval_scores": [score_of[c] for c in head],
                "tail": [r["id"] for r in body["results"][n:]],
                "orders": [{"positions": o["positions"], "probabilities": o["probabilities"]}
                           for o in orders]}) + "\n")


async def run_pass(client: Any, queries: Sequence[Any], n: int, orders: int,
                   concurrency: int, label: str) -> tuple[list[dict[str, Any]], list[float]]:
    from tqdm import tqdm

    bodies: list[dict[str, Any] | None] = [None] * len(queries)
    latencies: list[float] = []
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(queries), desc=label, file=sys.stderr, mininterval=5)

    async def one(i: int) -> None:
        async with gate:
            response = await client.post("/rank", json={
                "query": queries[i].text, "top_k": MAP_K, "candidates": n, "orders": orders,
                "fusion": "none", "debug": True})
        body = response.json()
        if response.status_code != 200 or not body.get("reranked"):
            raise RuntimeError(f"/rank answered {response.status_code}: {str(body)[:500]}")
        bodies[i] = body
        latencies.append(body["timings_ms"]["rerank"])
        bar.update()

    await asyncio.gather(*(one(i) for i in range(len(queries))))
    bar.close()
    return [b for b in bodies if b is not None], latencies


def _latency(samples: Sequence[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered), 1),
            "p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))], 1), "n": len(ordered)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import torch

    from retriever.eedi import eedi_queries
    from service.app import create_app
    from service.settings import load_settings

    data = Path(args.data)
    index_dir = Path(args.index_dir)
    settings = load_settings(index_dir=index_dir, default_candidates=args.candidates)
    build_index(data, index_dir, settings.embedder_model)
    queries = [q for q in eedi_queries(Path(args.queries) if args.queries
                                       else data / "train.csv") if q.misconception_id]
    random.Random(args.seed).shuffle(queries)
    queries = queries[: args.limit] if args.limit else queries
    labels = {q.id: [str(q.misconception_id)] for q in queries}
    n = args.candidates

    app = create_app(settings)
    report: dict[str, Any] = {
        "command": " ".join(sys.argv), "queries": len(queries), "candidates": n,
        "reranker": f"{settings.reranker.backend} {settings.reranker.model}",
        "embedder": settings.embedder_model, "load_average_before": os.getloadavg(),
        "torch_threads": torch.get_num_threads(), "concurrency": args.concurrency}
    started = time.perf_counter()
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://rankd.bench",
                                     timeout=600) as client:
            bodies, _ = await run_pass(client, queries, n, 2, args.concurrency, "2 orders")
            if args.dump:
                dump_scores(Path(args.dump), bodies, queries, n, report)
            rankings: dict[str, Rankings] = {}
            for body, query in zip(bodies, queries, strict=True):
                for name, ranked in schemes_of(body, n).items():
                    rankings.setdefault(name, Rankings()).ranked[query.id] = ranked
            # Latency one request at a time, on the subset, for each order scheme.
            subset = queries[: args.rotation_limit]
            if not subset:
                report["seconds"] = round(time.perf_counter() - started, 1)
                report["load_average_after"] = os.getloadavg()
                report["quality"] = {name: r.metrics(labels) for name, r in rankings.items()}
                report["position_bias"] = bias_of(bodies, n)
                return report
            latency = {}
            one_bodies, one_latency = await run_pass(client, subset, n, 1, 1, "1 order")
            latency["1 order"] = _latency(one_latency)
            _, two_latency = await run_pass(client, subset, n, 2, 1, "2 orders, latency")
            latency["2 orders"] = _latency(two_latency)
            rotation_rankings: dict[str, Rankings] = {}
            for k in args.rotations:
                rot_bodies, rot_latency = await run_pass(client, subset, n, k, 1,
                                                         f"{k} rotations")
                latency[f"{k} rotations"] = _latency(rot_latency)
                for body, query in zip(rot_bodies, subset, strict=True):
                    for name, ranked in schemes_of(body, n).items():
                        rotation_rankings.setdefault(name, Rankings()).ranked[query.id] = ranked
                # The 2-order schemes on the same subset, for a fair comparison.
                for name in ("retrieval only", "forward only", "two orders averaged",
                             "rrf w=0.5 + two orders averaged"):
                    rotation_rankings[f"{name} (same subset)"] = Rankings()
                    rotation_rankings[f"{name} (same subset)"].ranked = {
                        q.id: rankings[name].ranked[q.id] for q in subset}
            assert all(len(b["debug"]["orders"]) == 1 for b in one_bodies)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_after"] = os.getloadavg()
    report["quality"] = {name: r.metrics(labels) for name, r in rankings.items()}
    report["rotation_subset"] = len(subset)
    report["quality_rotation_subset"] = {name: r.metrics(labels)
                                         for name, r in rotation_rankings.items()}
    report["latency"] = latency
    report["position_bias"] = bias_of(bodies, n)
    return report


def print_report(report: dict[str, Any]) -> None:
    print(f"{report['queries']} Eedi queries, {report['candidates']} candidates, reranker "
          f"{report['reranker']}, {report['seconds']} s, load average before "
          f"{report['load_average_before']}, after {report['load_average_after']}")
    tables = [("all queries", report["quality"])]
    if "rotation_subset" in report:
        tables.append((f"rotation subset ({report['rotation_subset']} queries)",
                       report["quality_rotation_subset"]))
    for title, table in tables:
        print(f"\n{title}\n| ranking | MAP@25 | recall@1 | recall@5 | recall@10 | recall@25 |")
        print("|---|---|---|---|---|---|")
        for name, m in table.items():
            print(f"| {name} | {m['MAP@25']:.4f} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                  f"{m['recall@10']:.3f} | {m['recall@25']:.3f} |")
    print("\n| orders | rerank median ms | p90 ms | n |\n|---|---|---|---|")
    for name, lat in report.get("latency", {}).items():
        print(f"| {name} | {lat['median_ms']} | {lat['p90_ms']} | {lat['n']} |")
    print("\nposition bias:", json.dumps(report["position_bias"]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "eedi"))
    parser.add_argument("--index-dir", default="/tmp/rankd-bench-eedi-index")
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--queries", help="an Eedi CSV whose labelled rows are the queries, e.g. "
                                          "a training run's validation.csv (default: --data's "
                                          "train.csv)")
    parser.add_argument("--limit", type=int, default=0, help="queries (0: all 3,051)")
    parser.add_argument("--dump", help="write each query's scored orders here (JSON lines) for "
                                       "bench/fusion_sweep.py")
    parser.add_argument("--rotations", type=int, nargs="*", default=[10],
                        help="rotation counts k measured on the subset")
    parser.add_argument("--rotation-limit", type=int, default=60,
                        help="queries of the 1-order and rotation passes")
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="query sample order")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
