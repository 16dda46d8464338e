"""Does the gain a `rankd train-reranker` (or `train-pipeline`) run reports hold through the
service? Compares what `rankd serve` answered to the queries of the run's report with what the
report computed for them.

Serve the run (``RANKD_PIPELINE_DIR``, or ``RANKD_RERANKER_MODEL`` and its index), send the
reported queries through ``rankd batch`` twice, reranked and not, then:

    .venv/bin/python bench/served_gain.py ../runs/pipeline/reranker \\
        --served served.jsonl --retrieval retrieval.jsonl

For every query both files answered it gives MAP@25 served and as reported (the report's scores
fused by the fusion the run wrote to ``rankd_reranker.json``), how many top-25 rankings are the
same, and the served gain over retrieval with its paired-bootstrap interval over questions. No
model runs; it takes seconds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fusion_choice import K, read_run  # noqa: E402
from reranker.fusion import Fusion  # noqa: E402
from reranker.trained import SERVING_FILE  # noqa: E402
from reranker.training import FUSION_SCORES_FILE, TEST_SCORES_FILE, ranked_ids  # noqa: E402
from retriever.evaluation import average_precision, paired_bootstrap  # noqa: E402


def served_rankings(path: Path) -> dict[str, list[str]]:
    """Each answered query's ranked ids in a `rankd batch` output; errors are left out."""
    ranked = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row.get("response"):
            ranked[str(row["id"])] = [str(r["id"]) for r in row["response"]["results"]]
    return ranked


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the train-reranker output directory")
    parser.add_argument("--served", type=Path, required=True,
                        help="rankd batch output with the rerank")
    parser.add_argument("--retrieval", type=Path, required=True,
                        help="rankd batch output with --no-rerank")
    args = parser.parse_args(argv)

    settings = json.loads((args.run / SERVING_FILE).read_text(encoding="utf-8"))
    fusion, weight = Fusion(settings["fusion"]), float(settings["fusion_weight"])
    header = json.loads((args.run / FUSION_SCORES_FILE).read_text(encoding="utf-8")
                        .splitlines()[0])["header"]
    candidates = int(header["candidates"])
    reported = {query.key: (query, scores)
                for query, scores in read_run(args.run, [TEST_SCORES_FILE])}
    served, alone = served_rankings(args.served), served_rankings(args.retrieval)
    keys = sorted(set(served) & set(alone) & set(reported))
    if not keys:
        print("no query is in all three of the report, --served and --retrieval", file=sys.stderr)
        return 2
    after, before, as_reported, groups = {}, {}, {}, {}
    same = 0
    for key in keys:
        query, scores = reported[key]
        relevant = sorted(query.relevant)
        report_ranking = ranked_ids(query, scores, candidates, fusion, weight)[:K]
        same += served[key][:K] == report_ranking
        after[key] = average_precision(served[key], relevant, K)
        before[key] = average_precision(alone[key], relevant, K)
        as_reported[key] = average_precision(report_ranking, relevant, K)
        groups[key] = query.group
    gain = paired_bootstrap(after, before, groups)
    n = len(keys)
    print(json.dumps({
        "queries": n, "questions": gain["groups"], "fusion": f"{fusion.value} w {weight:g}",
        "served_map@25": round(sum(after.values()) / n, 4),
        "reported_map@25": round(sum(as_reported.values()) / n, 4),
        "retrieval_map@25": round(sum(before.values()) / n, 4),
        "same_top25": same,
        "largest_ap_difference": round(max(abs(after[k] - as_reported[k]) for k in keys), 4),
        "served_gain": {k: round(v, 4) if isinstance(v, float) else v for k, v in gain.items()},
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
