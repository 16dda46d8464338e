"""The retrievers' figures on the test questions, which nothing trained or chose on: run once,
at the end, after validation has chosen (``--split validation`` compares arms where the
choosing is done).

For each embedder (a model name or a `rankd train-retriever` output), MAP@25, recall@25 and
recall@1 of dense retrieval over the whole catalogue, overall, seen and unseen (a
misconception among the training split's positives), and the gain over the first one with its
95% interval by a paired bootstrap over questions. The split is the trainers' (seeded, by
question); the query text is `rankd batch`'s.

    .venv/bin/python bench/test_report.py --data path/to/eedi \
        sentence-transformers/all-MiniLM-L6-v2 ../runs/retriever-baseline ../runs/retriever-neg3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.hybrid_retrieval import K, _dense, _ranked, add_split_options, eedi_split  # noqa: E402
from retriever.evaluation import average_precisions, paired_bootstrap, summarize  # noqa: E402
from retriever.pairs import validation_set  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="embedders; the first is the baseline")
    add_split_options(parser)
    parser.add_argument("--split", choices=["test", "validation"], default="test",
                        help="validation: compare arms where choices are made (as often as "
                             "needed); test: the report, once, at the end")
    args = parser.parse_args(argv)
    ids, catalogue, split = eedi_split(args)
    test = validation_set(split if args.split == "validation"
                          else replace(split, validation=split.test))
    keys = sorted(test.queries)
    print(json.dumps({"host": platform.processor() or platform.machine(),
                      "load_average": os.getloadavg(), "split": args.split,
                      "queries": len(keys), "questions": len(set(test.groups.values()))}))
    baseline: dict[str, float] | None = None
    for model in args.models:
        started = time.perf_counter()
        ranked = _ranked(_dense(model, [test.queries[k] for k in keys], catalogue), keys, ids)
        per_query = average_precisions(ranked, test.relevant, K)
        row: dict[str, object] = {"model": model,
                                  **summarize(ranked, test.relevant, K, test.seen)}
        if baseline is None:
            baseline = per_query
        else:
            gain = paired_bootstrap(per_query, baseline, test.groups)
            row["gain_over_first"] = {k: round(v, 4) if isinstance(v, float) else v
                                      for k, v in gain.items()}
        row["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
