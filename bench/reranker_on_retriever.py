"""A trained reranker on another retriever's candidates: what it adds on top of a stronger
retriever, without training it again.

It reads a `rankd train-reranker` run (its split, seed, N and k from its report; its prompts
and scoring from ``rankd_reranker.json``, as `rankd serve` reads them), retrieves the run's
validation and test queries with ``--retriever`` over the catalogue, and scores their top N
with the trained model on the path `rankd serve` takes. It then chooses the fusion on the
validation questions, as `rankd train-reranker` does (``choose_fusion``), and reports on the
test questions, which nothing chose on (``--trained-fusion``: the test questions alone are
scored, under the run's own fusion):
- retrieval alone (and on validation);
- the reranker alone;
- the fusion chosen here, and the run's own trained fusion;
- the gain over retrieval, with its 95% interval by a paired bootstrap over questions;
- seen and unseen, by the training split's positives (as bench/gain_by_seen.py splits them).

With the run's own retriever it reproduces the run's report. ``--output DIR`` writes the scores
in the run's form (fusion_scores.jsonl, test_scores.jsonl) for bench/fusion_sweep.py.

    .venv/bin/python bench/reranker_on_retriever.py ../runs/pipeline-defaults/reranker \\
        --retriever ../runs/retriever-mpnet --output ../runs/reranker-on-mpnet
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from reranker.backends.transformers_backend import TransformersBackend  # noqa: E402
from reranker.config import RerankerConfig  # noqa: E402
from reranker.fusion import Fusion  # noqa: E402
from reranker.listwise import ListwiseScores  # noqa: E402
from reranker.prompt import load_tokenizer  # noqa: E402
from reranker.trained import with_trained_settings  # noqa: E402
from reranker.training import (  # noqa: E402
    FUSION_SCORES_FILE,
    TEST_SCORES_FILE,
    RerankerTrainingConfig,
    choose_fusion,
    fusions_for,
)
from reranker.training.data import retrieve_candidates, split_for_training  # noqa: E402
from reranker.training.evaluate import EvalQuery, RerankEvaluator  # noqa: E402
from reranker.training.examples import PromptBuilder  # noqa: E402
from retriever.catalog import read_catalog  # noqa: E402
from retriever.config import RetrieverSettings  # noqa: E402
from retriever.eedi import DEFAULT_QUERY_TEMPLATE  # noqa: E402
from retriever.pairs import REPORT_FILE, read_pairs  # noqa: E402
from runtime.paths import select_device  # noqa: E402
from runtime.settings import read_settings  # noqa: E402


def _row(evaluator: RerankEvaluator, scores: Sequence[ListwiseScores] | None,
         fusion: Fusion, weight: float) -> dict[str, Any]:
    """Retrieval's figures (``scores`` None) or a fusion's, overall, seen and unseen, with the
    fusion's gain over retrieval."""
    if scores is None:
        return evaluator.retrieval_only()
    row = evaluator.figures(scores, fusion, weight)
    if fusion is not Fusion.NONE:
        row["fusion"] = fusion.value
        row["gain"] = evaluator.gain(scores, fusion, weight)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a `rankd train-reranker` output directory")
    parser.add_argument("--retriever", required=True,
                        help="the embedder whose candidates it reranks: a model name or a "
                             "`rankd train-retriever` output")
    eedi = REPO.parent / "shared" / "data" / "eedi"
    parser.add_argument("--train", type=Path, default=eedi / "train.csv",
                        help="the Eedi train.csv the run trained on")
    parser.add_argument("--catalog", type=Path, default=eedi / "misconception_mapping.csv",
                        help="Eedi's misconception_mapping.csv")
    parser.add_argument("--output", type=Path, help="write the scores here")
    parser.add_argument("--trained-fusion", action="store_true",
                        help="score the test questions alone, under the run's own fusion (chosen "
                             "on its validation questions over its own retriever's candidates): "
                             "half the cost, no choice made here")
    args = parser.parse_args(argv)

    report = json.loads((args.run / REPORT_FILE).read_text(encoding="utf-8"))
    trained = report["config"]
    # The model as `rankd serve` reads it: RANKD_RERANKER_* with its rankd_reranker.json over.
    reranker, settings = with_trained_settings(RerankerConfig.from_env(
        model=str(args.run), backend="transformers"))
    candidates = settings.candidates or int(trained["candidates"])
    config = RerankerTrainingConfig(
        output_dir=args.output or args.run, reranker=reranker, retriever=args.retriever,
        retrieval=read_settings(RetrieverSettings), candidates=candidates,
        validation_fraction=float(trained["validation_fraction"]),
        test_fraction=float(trained["test_fraction"]), seed=int(trained["seed"]),
        k=int(trained["k"]), fusion_queries=int(trained["fusion_queries"]),
        eval_queries=int(trained["eval_queries"]), progress=False)
    entries = read_catalog(args.catalog, "MisconceptionId", "MisconceptionName")
    pairs = read_pairs(args.train, "eedi", DEFAULT_QUERY_TEMPLATE)
    print(json.dumps({"host": platform.processor() or platform.machine(),
                      "load_average": os.getloadavg(), "run": str(args.run),
                      "retriever": args.retriever, "candidates": candidates,
                      "scoring": reranker.scoring.value}))
    data = split_for_training(pairs, config)
    if not data.split.test:
        raise SystemExit(f"{args.run} has no test split: this bench reports on test questions")
    started = time.perf_counter()
    _, hits = retrieve_candidates(entries, data, config, training=False)
    retrieval_seconds = time.perf_counter() - started
    trained_ids = data.split.trained_ids
    both = data.validation  # the fusion's and the reported queries

    def queries(keys: list[str]) -> list[EvalQuery]:
        return [EvalQuery(k, both.queries[k], frozenset(both.relevant[k]), hits[k],
                          bool(both.relevant[k] & trained_ids), both.groups[k]) for k in keys]

    fusion_queries, test_queries = queries(data.fusion_keys), queries(data.eval_keys)
    tokenizer = load_tokenizer(str(args.run))
    builder = PromptBuilder(tokenizer, reranker, reranker.instruction)
    scored = test_queries if args.trained_fusion else fusion_queries + test_queries
    device = select_device(reranker.device)
    loaded = TransformersBackend.load(reranker.model_copy(update={"device": device}), tokenizer)
    started = time.perf_counter()
    scores = RerankEvaluator(scored, builder, config).score(loaded)
    scoring_seconds = time.perf_counter() - started
    fusion_scores, test_scores = scores[: -len(test_queries)], scores[-len(test_queries):]
    on_validation = RerankEvaluator(fusion_queries, builder, config)
    validation: dict[str, Any] = {
        "questions": len(data.fusion_groups), "queries": len(fusion_queries),
        "retrieval": _row(on_validation, None, Fusion.NONE, 0.0)}
    evaluator = RerankEvaluator(test_queries, builder, config)
    as_trained = (reranker.fusion, reranker.fusion_weight)
    test: dict[str, Any] = {
        "questions": len(data.eval_groups), "queries": len(test_queries),
        "retrieval": _row(evaluator, None, Fusion.NONE, 0.0),
        "reranker_alone": _row(evaluator, test_scores, Fusion.NONE, 0.0),
        "trained_fusion": _row(evaluator, test_scores, *as_trained)}
    if not args.trained_fusion:
        choice = choose_fusion(fusion_queries, fusion_scores, candidates, config.k,
                               fusions_for(reranker.scoring, reranker.orders))
        validation["chosen"] = {"fusion": choice.fusion.value, "weight": choice.weight,
                                "map": choice.map, "retrieval_map": choice.retrieval_map,
                                "reranker_alone_map": choice.reranker_alone_map}
        test["chosen_fusion"] = _row(evaluator, test_scores, choice.fusion, choice.weight)
    result = {
        "validation": validation, "test": test,
        "seconds": {"retrieval": round(retrieval_seconds, 1),
                    "scoring": round(scoring_seconds, 1)},
        "dtype": loaded.dtype.name}
    print(json.dumps(result, indent=2))
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        header = {"command": "bench/reranker_on_retriever.py", "candidates": candidates,
                  "reranker": f"{reranker.scoring.value} {args.run}",
                  "embedder": args.retriever}
        if fusion_scores:
            on_validation.write_scores(args.output / FUSION_SCORES_FILE,
                                       {**header, "queries": len(fusion_queries),
                                        "use": "fusion choice"}, fusion_scores)
        evaluator.write_scores(args.output / TEST_SCORES_FILE,
                               {**header, "queries": len(test_queries),
                                "use": "reported (test)"}, test_scores)
        (args.output / "reranker_on_retriever.json").write_text(
            json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
