"""`rankd train-reranker`: fine-tune the LLM reranker on labelled queries.

The prompts are the serving prompts. Candidates come from the retriever the service will use
(``--retriever`` through the service's embedder settings); each example is rendered by
serving's renderer, and the loss is over the label distribution serving reads
(``examples.py``). The stages are modules of their own, run in order by ``train_reranker``:

1. ``data``: the split (the retriever's), the validation questions the fusion is chosen on and
   those reported, and the candidates;
2. ``examples``: the training examples and their loss;
3. ``fit``: transformers' Trainer, in bfloat16 autocast where serving would choose bfloat16;
4. ``fit.save_model``: the model directory, with ``rankd_reranker.json`` (``reranker.trained``);
5. ``evaluate``: the written model loaded as `rankd serve` loads it (its dtype included), the
   fusion chosen on its own questions and written to ``rankd_reranker.json``, then the figures
   of the reported questions, with a bootstrap interval for the gain over retrieval.

A partial ``training_report.json`` is written before each expensive stage and the model before
any evaluation, so a run that stops late keeps what it paid for.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reranker.backends.transformers_backend import LoadedModel, TransformersBackend
from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion
from reranker.listwise import ListwiseScores
from reranker.precision import DtypeChoice, choose_dtype
from reranker.trained import SERVING_FILE, served_settings, write_served_settings
from reranker.training.config import (
    CHECKPOINT_DIR,
    FUSION_SCORES_FILE,
    RECIPE_SCORING,
    SCORES_FILE,
    TEST_SCORES_FILE,
    CandidateOrder,
    ExampleOrders,
    MissingPositive,
    RerankerTrainingConfig,
    RerankerTrainingError,
    TuningMethod,
)
from reranker.training.data import (
    FoldRetriever,
    fold_retrievers,
    retrieve_candidates,
    split_for_training,
)
from reranker.training.evaluate import (
    FUSION_SMOOTHING,
    EvalQuery,
    RerankEvaluator,
    carried_gain,
    choose_fusion,
    fusions_for,
    ranked_ids,
)
from reranker.training.examples import PromptBuilder, build_examples, example_loss
from reranker.training.fit import fit, freeze_below, lora, save_model, trainable
from retriever.pairs import REPORT_FILE
from runtime.paths import select_device

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.pairs import TrainingPair

log = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_DIR", "FUSION_SCORES_FILE", "RECIPE_SCORING", "SCORES_FILE", "SERVING_FILE", "TEST_SCORES_FILE",
           "CandidateOrder", "EvalQuery", "ExampleOrders", "MissingPositive", "PromptBuilder",
           "RerankEvaluator", "RerankerTrainingConfig", "RerankerTrainingError", "TuningMethod",
           "build_examples", "example_loss", "ranked_ids", "train_reranker",
           "training_precision"]


def training_precision(served: DtypeChoice, device: str) -> DtypeChoice:
    """The precision training computes in: bfloat16 autocast where serving chooses bfloat16
    (the same rule, ``choose_dtype``), float16 autocast on a GPU without bf16, else float32."""
    if served.name == "bfloat16" or (served.name == "float16" and device.startswith("cuda")):
        return DtypeChoice(served.name, f"autocast over float32 weights; serving's {served}")
    return DtypeChoice("float32", f"serving's {served}")


def _write_report(output: Path, report: dict[str, Any]) -> None:
    (output / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")


def train_reranker(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
                   config: RerankerTrainingConfig, train_file: Path, train_format: str,
                   instruction: str | None = None) -> dict[str, Any]:
    """Train, save the model to ``config.output_dir``, choose its fusion, evaluate and write the
    report."""
    config.check()
    import torch
    from transformers import AutoModelForCausalLM

    from reranker.models import resolve_model
    from reranker.prompt import load_tokenizer
    from retriever.pairs import check_positives, prepare_output, write_validation_file
    from retriever.training_components import peak_rss_mib
    from retriever.vocabulary import Hit

    check_positives(pairs, entries)
    folds = fold_retrievers(config)
    output = Path(config.output_dir)
    prepare_output(output, config.overwrite)
    if config.threads:
        torch.set_num_threads(config.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    seconds: dict[str, Any] = {}
    device = select_device(config.device)
    torch.manual_seed(config.seed)

    data = split_for_training(pairs, config)
    reported_on = "test" if data.split.test else "validation"
    # The reported questions' file (for `rankd batch` and `rankd eval` through the service),
    # and, with a test split, the questions that chose the fusion.
    reported_path = write_validation_file(train_file, train_format, data.eval_groups, output,
                                          reported_on)
    if data.split.test:
        write_validation_file(train_file, train_format, data.fusion_groups, output)

    stage = time.perf_counter()
    train_hits, eval_hits = retrieve_candidates(entries, data, config, folds)
    # A positive the retriever missed joins the candidates as itself, with no retrieval score.
    by_id = {e.id: Hit(e.id, e.text, 0.0) for e in entries}
    seconds["retrieval"] = round(time.perf_counter() - stage, 1)

    location = resolve_model(config.reranker.model or "", config.reranker.cache_dir)
    tokenizer = load_tokenizer(location)
    instruction = instruction or config.reranker.instruction
    builder = PromptBuilder(tokenizer, config.reranker, instruction)
    stage = time.perf_counter()
    examples, stats = build_examples(data.train_pairs, train_hits, by_id, builder, config)
    seconds["examples"] = round(time.perf_counter() - stage, 1)
    if not examples:
        raise RerankerTrainingError("no training examples remain (every positive was missing "
                                    "or every prompt was over --max-tokens)")
    trained_ids = {e.positive_id for e in examples}
    validation = data.validation

    def queries(keys: list[str]) -> list[EvalQuery]:
        return [EvalQuery(k, validation.queries[k], frozenset(validation.relevant[k]),
                          eval_hits[k], bool(validation.relevant[k] & trained_ids),
                          validation.groups[k]) for k in keys]

    fusion_queries, report_queries = queries(data.fusion_keys), queries(data.eval_keys)
    everything = RerankEvaluator(fusion_queries + report_queries, builder, config)
    evaluator = RerankEvaluator(report_queries, builder, config)
    curve_evaluator = evaluator.subset(config.curve_queries)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    served_dtype = choose_dtype(config.reranker.dtype, device)
    precision = training_precision(served_dtype, device)
    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = model.to(device)
    if config.method is TuningMethod.LORA:
        model = lora(model, config)
    elif config.train_layers:
        freeze_below(model, config.train_layers)
    n_trainable, n_total = trainable(model)
    log.info("%d of %d parameters train (%s) in %s; %d examples, %d prompts", n_trainable,
             n_total, config.method, precision, len(examples), stats.prompts)
    retrieval = config.retrieval
    report: dict[str, Any] = {
        "status": "training",
        "base_model": config.reranker.model,
        "output": str(output.resolve()),
        "reported_file": str(reported_path.resolve()),
        "reported_on": reported_on,
        "device": device,
        "precision": {"training": str(precision), "serving": str(served_dtype)},
        "config": _plain({**asdict(config), "retrieval": None}),
        "scoring": config.scoring.value,
        "instruction": instruction,
        "retriever": {"model": config.retriever,
                      "backend": retrieval.embedder_backend.value,
                      "quantization": retrieval.embedder_quantization.value,
                      "device": retrieval.embedder_device,
                      **_retriever_report(config.retriever),
                      "cross_fit": _cross_fit_report(folds, data.train_pairs, config.seed)},
        "parameters": {"trainable": n_trainable, "total": n_total},
        "split": {"pairs": len(pairs), "train_pairs": len(data.split.train),
                  "validation_pairs": len(data.split.validation),
                  "validation_questions": len({p.group for p in data.split.validation}),
                  "test_pairs": len(data.split.test),
                  "test_questions": len({p.group for p in data.split.test}),
                  "fusion_questions": len(data.fusion_groups),
                  "fusion_queries": len(fusion_queries),
                  "evaluated_questions": len(data.eval_groups),
                  "evaluated_queries": len(report_queries),
                  "curve_queries": len(curve_evaluator.queries)},
        "examples": stats.summary(),
        "trained_groups": sorted({p.group for p in data.train_pairs}),
        "validation_groups": sorted({p.group for p in data.split.validation}),
        "test_groups": sorted({p.group for p in data.split.test}),
        "retrieval_only": evaluator.retrieval_only(),
        "ceiling": evaluator.ceiling(),
        "seconds": seconds,
    }
    _write_report(output, report)

    def training_weights() -> LoadedModel:
        """The model in training, read as training reads it (frozen weights in the compute
        dtype, trainable ones float32, under autocast where that dtype is not float32)."""
        inner = model.get_base_model() if config.method is TuningMethod.LORA else model
        return LoadedModel(inner, device, int(pad), precision,
                           autocast=precision.name != "float32")

    curve_points: list[tuple[int, int, list[ListwiseScores]]] = []

    def score_curve(step: int, seen: int) -> str:
        model.eval()
        try:
            scores = curve_evaluator.score(training_weights())
        finally:
            model.train()
        curve_points.append((step, seen, scores))
        return f"reranker alone MAP@{config.k} {curve_evaluator.figures(scores, Fusion.NONE, 0)['map']}"

    stage = time.perf_counter()
    base_scores: list[ListwiseScores] | None = None
    if config.base_eval:
        model.eval()  # LoRA starts at zero: the peft model is the base
        base_scores = everything.score(training_weights())
        model.train()
        curve_points.append((0, 0, base_scores[len(fusion_queries):]
                             [: len(curve_evaluator.queries)]))
    seconds["evaluate_base"] = round(time.perf_counter() - stage, 1)

    fitted = fit(model, examples, config, device, int(pad), output, precision, score_curve)
    seconds["train"] = round(fitted.train_seconds, 1)
    seconds["evaluate_curve"] = round(fitted.curve_seconds, 1)
    seconds["train_per_example"] = round(fitted.train_seconds / (len(examples) * config.epochs),
                                         3)

    stage = time.perf_counter()
    save_model(fitted, tokenizer, config, output,
               served_settings(config.reranker, instruction, config.candidates))
    seconds["save"] = round(time.perf_counter() - stage, 1)
    report.update(status="trained; evaluating", train_loss=fitted.loss,
                  peak_rss_mib=round(peak_rss_mib(), 1))
    _write_report(output, report)

    # The written model, loaded the way `rankd serve` loads it (its dtype rule included).
    stage = time.perf_counter()
    served = config.reranker.model_copy(update={"model": str(output), "backend": "transformers",
                                                "device": device})
    scores = everything.score(TransformersBackend.load(served, tokenizer))
    fusion_scores, report_scores = scores[:len(fusion_queries)], scores[len(fusion_queries):]
    seconds["evaluate_fine_tuned"] = round(time.perf_counter() - stage, 1)
    choice = choose_fusion(fusion_queries, fusion_scores, config.candidates, config.k,
                           fusions_for(config.scoring, config.reranker.orders))
    write_served_settings(output, served_settings(config.reranker, instruction,
                                                  config.candidates, choice.served()))
    header = {"command": "rankd train-reranker", "candidates": config.candidates,
              "reranker": f"{config.scoring} {output}", "embedder": config.retriever}
    RerankEvaluator(fusion_queries, builder, config).write_scores(
        output / FUSION_SCORES_FILE, {**header, "queries": len(fusion_queries),
                                      "use": "fusion choice"}, fusion_scores)
    evaluator.write_scores(output / (TEST_SCORES_FILE if data.split.test else SCORES_FILE),
                           {**header, "queries": len(report_queries),
                            "use": f"reported ({reported_on})"}, report_scores)
    carried = carried_gain(fusion_queries, fusion_scores, config.candidates, config.k,
                           fusions_for(config.scoring, config.reranker.orders), config.seed)

    def figures(chosen: RerankEvaluator, scored: list[ListwiseScores],
                dtype: str) -> dict[str, Any]:
        found: dict[str, Any] = {
            Fusion.NONE.value: chosen.figures(scored, Fusion.NONE, 0.0),
            DEFAULT_FUSION.value: chosen.figures(scored, DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT),
            "served": {"fusion": choice.fusion.value,
                       **chosen.figures(scored, choice.fusion, choice.weight)},
            "gain": chosen.gain(scored, choice.fusion, choice.weight),
            "dtype": dtype}
        agreement = chosen.agreement(scored)
        if agreement is not None:
            found["mean_agreement"] = agreement
        return found

    fine_tuned = figures(evaluator, report_scores, served_dtype.name)
    base = (figures(evaluator, base_scores[len(fusion_queries):], precision.name)
            if base_scores is not None else None)
    final_on_curve = report_scores[: len(curve_evaluator.queries)]
    curve = [{"step": step, "examples": seen,
              **{k: v for k, v in figures(curve_evaluator, scored, precision.name).items()
                 if k in (Fusion.NONE.value, "served")}}
             for step, seen, scored in [*curve_points, (fitted.steps, round(
                 len(examples) * config.epochs), final_on_curve)]]
    seconds["total"] = round(time.perf_counter() - started, 1)
    seconds["cpu_total"] = round(time.process_time() - cpu_started, 1)
    report.update(status="complete", fusion={
        "chosen": choice.fusion.value, "weight": choice.weight,
        "on": {"queries": choice.queries, "map": choice.map,
               "retrieval_map": choice.retrieval_map,
               "reranker_alone_map": choice.reranker_alone_map},
        "table": choice.table, "smoothed": choice.smoothed,
        "smoothing": f"each weight judged by the mean MAP of the weights within "
                     f"{FUSION_SMOOTHING} of it",
        "carried": carried}, base=base, fine_tuned=fine_tuned, learning_curve=curve,
        peak_rss_mib=round(peak_rss_mib(), 1))
    if device.startswith("cuda"):
        report["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    _write_report(output, report)
    return report


def _retriever_report(retriever: str) -> dict[str, Any]:
    """The retriever's own validation figures, when it is a `rankd train-retriever` output."""
    path = Path(retriever) / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return {}
    return {key: report[key] for key in ("zero_shot", "fine_tuned", "validation_groups")
            if key in report}


def _cross_fit_report(folds: Sequence[FoldRetriever], train_pairs: Sequence[TrainingPair],
                      seed: int) -> list[dict[str, Any]] | None:
    """Each fold's retriever: the training pairs it retrieved for, and its own validation
    figures (it trained on fewer questions than the served one)."""
    if not folds:
        return None
    from retriever.pairs import fold_of

    return [{"fold": f.fold, "model": f.model,
             "pairs": sum(fold_of(p.group, len(folds), seed) == f.fold for p in train_pairs),
             "fine_tuned": f.report.get("fine_tuned")} for f in folds]


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)

