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
from dataclasses import asdict, dataclass
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
    TrainingData,
    fold_retrievers,
    retrieve_candidates,
    split_for_training,
)
from reranker.training.evaluate import (
    FUSION_SMOOTHING,
    EvalQuery,
    FusionChoice,
    RerankEvaluator,
    carried_gain,
    choose_fusion,
    fusions_for,
    ranked_ids,
)
from reranker.training.examples import (
    Example,
    ExampleStats,
    PromptBuilder,
    build_examples,
    example_loss,
)
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


@dataclass
class _Prepared:
    """What the stages before training produce: the split, the candidates, the prompts."""

    output: Path
    data: TrainingData
    reported_on: str  # "test", or "validation" without a test split
    reported_path: Path
    folds: list[FoldRetriever]
    tokenizer: Any
    location: str
    builder: PromptBuilder
    instruction: str
    examples: list[Example]
    stats: ExampleStats
    fusion_queries: list[EvalQuery]
    report_queries: list[EvalQuery]


def _prepare(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
             config: RerankerTrainingConfig, train_file: Path, train_format: str,
             instruction: str | None, seconds: dict[str, Any]) -> _Prepared:
    """The split and its files, each query's candidates as the service retrieves them, and the
    training examples rendered by serving's renderer."""
    from reranker.models import resolve_model
    from reranker.prompt import load_tokenizer
    from retriever.pairs import check_positives, prepare_output, write_validation_file
    from retriever.vocabulary import Hit

    check_positives(pairs, entries)
    folds = fold_retrievers(config)
    output = Path(config.output_dir)
    prepare_output(output, config.overwrite)
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

    return _Prepared(output, data, reported_on, reported_path, folds, tokenizer, location,
                     builder, instruction, examples, stats, queries(data.fusion_keys),
                     queries(data.eval_keys))


class _InTraining:
    """The model in training, read as training reads it (frozen weights in the compute dtype,
    trainable ones float32, under autocast where that dtype is not float32), and the learning
    curve's evaluations of it."""

    def __init__(self, model: Any, config: RerankerTrainingConfig, device: str, pad: int,
                 precision: DtypeChoice, curve: RerankEvaluator) -> None:
        self.model, self.config, self.device, self.pad = model, config, device, pad
        self.precision, self.curve = precision, curve
        self.points: list[tuple[int, int, list[ListwiseScores]]] = []

    def weights(self) -> LoadedModel:
        inner = (self.model.get_base_model() if self.config.method is TuningMethod.LORA
                 else self.model)
        return LoadedModel(inner, self.device, self.pad, self.precision,
                           autocast=self.precision.name != "float32")

    def score(self, evaluator: RerankEvaluator) -> list[ListwiseScores]:
        self.model.eval()  # LoRA starts at zero: the peft model is the base
        try:
            return evaluator.score(self.weights())
        finally:
            self.model.train()

    def __call__(self, step: int, seen: int) -> str:
        """A learning-curve point, during training."""
        scores = self.score(self.curve)
        self.points.append((step, seen, scores))
        alone = self.curve.figures(scores, Fusion.NONE, 0)["map"]
        return f"reranker alone MAP@{self.config.k} {alone}"


def _load_for_training(config: RerankerTrainingConfig, location: str, device: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    model = model.to(device)
    if config.method is TuningMethod.LORA:
        return lora(model, config)
    if config.train_layers:
        freeze_below(model, config.train_layers)
    return model


def _figures(evaluator: RerankEvaluator, scored: list[ListwiseScores], choice: FusionChoice,
             dtype: str) -> dict[str, Any]:
    """A model's figures on the reported queries: alone, under the service's default fusion,
    under the chosen one, and the chosen one's gain over retrieval with its interval."""
    found: dict[str, Any] = {
        Fusion.NONE.value: evaluator.figures(scored, Fusion.NONE, 0.0),
        DEFAULT_FUSION.value: evaluator.figures(scored, DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT),
        "served": {"fusion": choice.fusion.value,
                   **evaluator.figures(scored, choice.fusion, choice.weight)},
        "gain": evaluator.gain(scored, choice.fusion, choice.weight),
        "dtype": dtype}
    agreement = evaluator.agreement(scored)
    if agreement is not None:
        found["mean_agreement"] = agreement
    return found


def _report_head(config: RerankerTrainingConfig, run: _Prepared, pairs: int, device: str,
                 precision: DtypeChoice, served_dtype: DtypeChoice, parameters: tuple[int, int],
                 evaluator: RerankEvaluator, curve: RerankEvaluator,
                 seconds: dict[str, Any]) -> dict[str, Any]:
    """The report before training: the split, the examples and retrieval's figures."""
    data, retrieval = run.data, config.retrieval
    return {
        "status": "training",
        "base_model": config.reranker.model,
        "output": str(run.output.resolve()),
        "reported_file": str(run.reported_path.resolve()),
        "reported_on": run.reported_on,
        "device": device,
        "precision": {"training": str(precision), "serving": str(served_dtype)},
        "config": _plain({**asdict(config), "retrieval": None}),
        "scoring": config.scoring.value,
        "instruction": run.instruction,
        "retriever": {"model": config.retriever,
                      "backend": retrieval.embedder_backend.value,
                      "quantization": retrieval.embedder_quantization.value,
                      "device": retrieval.embedder_device,
                      **_retriever_report(config.retriever),
                      "cross_fit": _cross_fit_report(run.folds, data.train_pairs, config.seed)},
        "parameters": {"trainable": parameters[0], "total": parameters[1]},
        "split": {"pairs": pairs, "train_pairs": len(data.split.train),
                  "validation_pairs": len(data.split.validation),
                  "validation_questions": len({p.group for p in data.split.validation}),
                  "test_pairs": len(data.split.test),
                  "test_questions": len({p.group for p in data.split.test}),
                  "fusion_questions": len(data.fusion_groups),
                  "fusion_queries": len(run.fusion_queries),
                  "evaluated_questions": len(data.eval_groups),
                  "evaluated_queries": len(run.report_queries),
                  "curve_queries": len(curve.queries)},
        "examples": run.stats.summary(),
        "trained_groups": sorted({p.group for p in data.train_pairs}),
        "validation_groups": sorted({p.group for p in data.split.validation}),
        "test_groups": sorted({p.group for p in data.split.test}),
        "retrieval_only": evaluator.retrieval_only(),
        "ceiling": evaluator.ceiling(),
        "seconds": seconds,
    }


def train_reranker(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry],
                   config: RerankerTrainingConfig, train_file: Path, train_format: str,
                   instruction: str | None = None) -> dict[str, Any]:
    """Train, save the model to ``config.output_dir``, choose its fusion, evaluate and write the
    report: the stages in order (see the module's docstring)."""
    config.check()
    import torch

    from retriever.training_components import peak_rss_mib

    started, cpu_started = time.perf_counter(), time.process_time()
    seconds: dict[str, Any] = {}
    device = select_device(config.device)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    run = _prepare(pairs, entries, config, train_file, train_format, instruction, seconds)
    output = run.output
    everything = RerankEvaluator(run.fusion_queries + run.report_queries, run.builder, config)
    evaluator = RerankEvaluator(run.report_queries, run.builder, config)
    curve_evaluator = evaluator.subset(config.curve_queries)
    pad = (run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None
           else run.tokenizer.eos_token_id)
    served_dtype = choose_dtype(config.reranker.dtype, device)
    precision = training_precision(served_dtype, device)
    model = _load_for_training(config, run.location, device)
    n_trainable, n_total = trainable(model)
    log.info("%d of %d parameters train (%s) in %s; %d examples, %d prompts", n_trainable,
             n_total, config.method, precision, len(run.examples), run.stats.prompts)
    report = _report_head(config, run, len(pairs), device, precision, served_dtype,
                          (n_trainable, n_total), evaluator, curve_evaluator, seconds)
    _write_report(output, report)

    in_training = _InTraining(model, config, device, int(pad), precision, curve_evaluator)
    stage = time.perf_counter()
    base_scores: list[ListwiseScores] | None = None
    if config.base_eval:
        base_scores = in_training.score(everything)
        in_training.points.append((0, 0, base_scores[len(run.fusion_queries):]
                                   [: len(curve_evaluator.queries)]))
    seconds["evaluate_base"] = round(time.perf_counter() - stage, 1)

    fitted = fit(model, run.examples, config, device, int(pad), output, precision, in_training)
    seconds["train"] = round(fitted.train_seconds, 1)
    seconds["evaluate_curve"] = round(fitted.curve_seconds, 1)
    seconds["train_per_example"] = round(
        fitted.train_seconds / (len(run.examples) * config.epochs), 3)

    stage = time.perf_counter()
    save_model(fitted, run.tokenizer, config, output,
               served_settings(config.reranker, run.instruction, config.candidates))
    seconds["save"] = round(time.perf_counter() - stage, 1)
    report.update(status="trained; evaluating", train_loss=fitted.loss,
                  peak_rss_mib=round(peak_rss_mib(), 1))
    _write_report(output, report)

    # The written model, loaded the way `rankd serve` loads it (its dtype rule included).
    stage = time.perf_counter()
    served = config.reranker.model_copy(update={"model": str(output), "backend": "transformers",
                                                "device": device})
    scores = everything.score(TransformersBackend.load(served, run.tokenizer))
    n_fusion = len(run.fusion_queries)
    fusion_scores, report_scores = scores[:n_fusion], scores[n_fusion:]
    seconds["evaluate_fine_tuned"] = round(time.perf_counter() - stage, 1)
    methods = fusions_for(config.scoring, config.reranker.orders)
    choice = choose_fusion(run.fusion_queries, fusion_scores, config.candidates, config.k,
                           methods)
    write_served_settings(output, served_settings(config.reranker, run.instruction,
                                                  config.candidates, choice.served()))
    header = {"command": "rankd train-reranker", "candidates": config.candidates,
              "reranker": f"{config.scoring} {output}", "embedder": config.retriever}
    RerankEvaluator(run.fusion_queries, run.builder, config).write_scores(
        output / FUSION_SCORES_FILE, {**header, "queries": n_fusion, "use": "fusion choice"},
        fusion_scores)
    evaluator.write_scores(output / (TEST_SCORES_FILE if run.data.split.test else SCORES_FILE),
                           {**header, "queries": len(run.report_queries),
                            "use": f"reported ({run.reported_on})"}, report_scores)
    carried = carried_gain(run.fusion_queries, fusion_scores, config.candidates, config.k,
                           methods, config.seed)

    fine_tuned = _figures(evaluator, report_scores, choice, served_dtype.name)
    base = (_figures(evaluator, base_scores[n_fusion:], choice, precision.name)
            if base_scores is not None else None)
    final_on_curve = report_scores[: len(curve_evaluator.queries)]
    curve = [{"step": step, "examples": seen,
              **{k: v for k, v in _figures(curve_evaluator, scored, choice,
                                           precision.name).items()
                 if k in (Fusion.NONE.value, "served")}}
             for step, seen, scored in [*in_training.points, (fitted.steps, round(
                 len(run.examples) * config.epochs), final_on_curve)]]
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

