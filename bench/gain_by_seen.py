"""The served gain of `rankd train-reranker` runs over retrieval, split one way for all runs.

A run's report splits its validation queries into seen and unseen by its own examples (a
misconception some training example had as its positive), so two runs with different examples
split the queries differently. This bench splits them by the training split's positives (every
pair left after validation and test, the same for every run of one split, which each run's
report records), and gives each run's gain on both parts of its reported questions under the
fusion it wrote to ``rankd_reranker.json``, from the scores it wrote (``test_scores.jsonl``, or
``validation_scores.jsonl`` for a run without a test split). No model runs; it takes seconds.

    .venv/bin/python bench/gain_by_seen.py --train ../shared/data/eedi/train.csv \\
        ../runs/arm-lr3e-4 ../runs/arm-crossfit
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
from retriever.pairs import REPORT_FILE, read_pairs, split_pairs  # noqa: E402


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="train-reranker output directories")
    parser.add_argument("--train", required=True, help="the labelled pairs the runs trained on")
    parser.add_argument("--format", default="eedi", choices=["eedi", "jsonl"])
    args = parser.parse_args(argv)
    pairs = read_pairs(args.train, args.format)
    for run in args.runs:
        # The run's own split, as its report records it.
        config = json.loads((run / REPORT_FILE).read_text(encoding="utf-8"))["config"]
        split = split_pairs(pairs, config["validation_fraction"], seed=config["seed"],
                            test_fraction=config.get("test_fraction", 0.0))
        trained = split.trained_ids
        served = json.loads((run / SERVING_FILE).read_text(encoding="utf-8"))
        fusion, weight = Fusion(served["fusion"]), float(served["fusion_weight"])
        header = json.loads((run / FUSION_SCORES_FILE).read_text(encoding="utf-8")
                            .splitlines()[0])["header"]
        reported = (read_run(run, [TEST_SCORES_FILE]) if split.test
                    else read_run(run)[header["queries"]:])  # the fusion's queries come first
        candidates = int(header["candidates"])  # the N the scores were read at
        parts: dict[str, list[tuple[float, float]]] = {"seen": [], "unseen": []}
        after, before, groups = {}, {}, {}
        for query, scores in reported:
            relevant = sorted(query.relevant)
            fused = average_precision(ranked_ids(query, scores, candidates, fusion, weight),
                                      relevant, K)
            alone = average_precision([h.id for h in query.hits], relevant, K)
            parts["seen" if query.relevant & trained else "unseen"].append((fused, alone))
            after[query.key], before[query.key], groups[query.key] = fused, alone, query.group
        gain = paired_bootstrap(after, before, groups)
        print(f"{run}: {fusion.value} w {weight:g}, {len(reported)} queries, gain "
              f"{gain['gain']:+.4f} [{gain['low']:+.4f}, {gain['high']:+.4f}]")
        for name, pairs in parts.items():
            fused_map = sum(f for f, _ in pairs) / len(pairs)
            alone_map = sum(a for _, a in pairs) / len(pairs)
            print(f"  {name} ({len(pairs)}): served {fused_map:.4f}, retrieval {alone_map:.4f}, "
                  f"gain {fused_map - alone_map:+.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
