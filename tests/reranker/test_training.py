"""`rankd train-reranker` on the tiny random model, listwise and pointwise: the loss, the written
model, the prompts, the candidates' order, the split, and `rankd eval` reproducing the reported
MAP@25."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from rankd.cli import main
from reranker.backends.transformers_backend import TransformersBackend
from reranker.config import RerankerConfig, Scoring
from reranker.fusion import DEFAULT_FUSION_WEIGHT
from reranker.prompt import load_tokenizer
from reranker.training import (
    SERVING_FILE,
    CandidateOrder,
    ExampleOrders,
    MissingPositive,
    PromptBuilder,
    RerankerTrainingConfig,
    RerankerTrainingError,
    TuningMethod,
    build_examples,
    example_loss,
    train_reranker,
)
from retriever.catalog import CatalogEntry
from retriever.data import (
    SAMPLE_COLLECTION,
    SAMPLE_INSTRUCTION,
    sample_catalog_path,
    sample_entries,
)
from retriever.pairs import TrainingPair, read_pairs
from retriever.vocabulary import Hit
from service.settings import Settings
from tests.retriever.test_training import write_eedi_csv
from tests.support.apps import app_client, serve_in_thread

CANDIDATES = 5


def _entries() -> list[CatalogEntry]:
    return sample_entries()


@pytest.fixture(scope="module")
def eedi_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eedi_csv(tmp_path_factory.mktemp("eedi") / "train.csv", _entries())


def _config(output: Path, tiny_lm: Path, **overrides: Any) -> RerankerTrainingConfig:
    scoring = overrides.pop("scoring", Scoring.LISTWISE)
    values: dict[str, Any] = dict(
        # float32 as the served app of settings_factory is, on any CPU (auto: bf16 on AMX);
        # one query's prompts a pass, as the service runs a lone request (_pass_size).
        output_dir=output, reranker=RerankerConfig(model=str(tiny_lm), scoring=scoring,
                                                   dtype="float32",
                                                   batch_size=_pass_size(scoring)),
        device="cpu", candidates=CANDIDATES, examples=200, epochs=3, learning_rate=1e-2,
        gradient_accumulation=2, method=TuningMethod.LORA, lora_rank=8,
        validation_fraction=0.25, fusion_queries=8, eval_queries=0, curve_points=1,
        curve_queries=0,
        example_orders=ExampleOrders.BOTH, missing_positive=MissingPositive.INSERT,
        train_layers=0, base_eval=True, progress=False)
    values.update(overrides)
    return RerankerTrainingConfig(**values)


def _pass_size(scoring: Scoring) -> int:
    """One query's prompts: a pass of the evaluation then holds what a lone /rank's pass holds.
    The tiny model's scores tie to 1e-8, and a float32 pass of other shapes breaks such ties
    either way, so comparing the trainer's figures with the service's needs the same passes."""
    return 2 if scoring is Scoring.LISTWISE else CANDIDATES


def _train(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path, eedi_csv: Path,
           scoring: Scoring) -> dict[str, Any]:
    output = tmp_path_factory.mktemp(f"reranker-{scoring}") / "model"
    # Shuffled: a tiny model trained on the served orders learns their positions, and its two
    # orders then average to near-ties that batch composition can break either way.
    # Pointwise, LoRA at this rate collapses the tiny model's yes/no scores to ties 1e-7 apart,
    # which float noise between batch compositions reorders; full fine-tuning keeps them apart.
    tuning: dict[str, Any] = ({"method": TuningMethod.FULL, "train_layers": 0,
                               "learning_rate": 1e-3} if scoring is Scoring.POINTWISE else {})
    config = _config(output, tiny_lm, scoring=scoring, candidate_order=CandidateOrder.SHUFFLED,
                     **tuning)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi",
                            instruction=SAMPLE_INSTRUCTION)
    return {"report": report, "output": output, "config": config}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path,
            eedi_csv: Path) -> dict[str, Any]:
    return _train(tmp_path_factory, tiny_lm, eedi_csv, Scoring.LISTWISE)


@pytest.fixture(scope="module")
def trained_pointwise(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path,
                      eedi_csv: Path) -> dict[str, Any]:
    return _train(tmp_path_factory, tiny_lm, eedi_csv, Scoring.POINTWISE)


def _fixed_hits(pairs: list[TrainingPair], entries: list[CatalogEntry]) -> list[list[Hit]]:
    """Candidates as the positive plus the next entries of the catalogue, in a fixed order."""
    return [[Hit(e.id, e.text, 0.0) for e in
             [next(e for e in entries if e.id == p.positive_id),
              *[e for e in entries if e.id != p.positive_id][i:i + CANDIDATES - 1]]]
            for i, p in enumerate(pairs)]


def _mean_loss(model_dir: Path, tokenizer: Any, examples: list[Any], scoring: Scoring) -> float:
    config = RerankerConfig(model=str(model_dir), device="cpu", dtype="float32")
    backend = TransformersBackend(TransformersBackend.load(config, tokenizer), config)
    with torch.no_grad():
        return float(example_loss(backend, examples, scoring))


@pytest.mark.parametrize("scoring", [Scoring.LISTWISE, Scoring.POINTWISE])
def test_training_lowers_the_loss(scoring: Scoring, trained: dict[str, Any],
                                  trained_pointwise: dict[str, Any], tiny_lm: Path,
                                  eedi_csv: Path) -> None:
    run = trained if scoring is Scoring.LISTWISE else trained_pointwise
    report = run["report"]
    tokenizer = load_tokenizer(str(tiny_lm))
    builder = PromptBuilder(tokenizer, run["config"].reranker, SAMPLE_INSTRUCTION)
    pairs = [p for p in read_pairs(eedi_csv, "eedi") if p.group in set(report["trained_groups"])]
    examples, _ = build_examples(pairs, _fixed_hits(pairs, _entries()), {}, builder,
                                 run["config"])
    before = _mean_loss(tiny_lm, tokenizer, examples, scoring)
    after = _mean_loss(run["output"], tokenizer, examples, scoring)
    assert after < before - 0.1, (before, after)
    losses = [row["loss"] for row in report["train_loss"]]
    assert losses, report
    assert sum(losses[-3:]) / len(losses[-3:]) < sum(losses[:3]) / len(losses[:3])


def test_the_report_has_every_stage(trained: dict[str, Any]) -> None:
    report = trained["report"]
    assert report["status"] == "complete"
    assert report["scoring"] == "listwise"
    for name in ("retrieval_only", "ceiling", "base", "fine_tuned"):
        figures = report[name] if name in ("retrieval_only", "ceiling") else report[name]["none"]
        assert 0 <= figures["map"] <= 1
        assert figures["queries"] == figures["seen"] + figures["unseen"] > 0
    assert report["ceiling"]["map"] >= report["retrieval_only"]["map"]
    assert 0 < report["ceiling"]["positive_in_head_share"] <= 1
    assert {"none", "consensus"} <= set(report["fine_tuned"])
    assert -1 <= report["fine_tuned"]["mean_agreement"] <= 1
    curve = report["learning_curve"]
    assert [point["examples"] for point in curve] == sorted(point["examples"] for point in curve)
    assert len(curve) == 3  # the base, one point during training, the written model
    assert curve[0]["none"] == report["base"]["none"]
    assert curve[-1]["none"] == report["fine_tuned"]["none"]
    examples = report["examples"]
    assert examples["pairs"] == examples["positive_in_top_n"] + examples["positive_inserted"] \
        + examples["skipped_missing_positive"]
    assert examples["prompts"] == 2 * examples["examples"]  # each example in both orders
    for stage in ("retrieval", "examples", "evaluate_base", "train", "save",
                  "evaluate_fine_tuned", "total"):
        assert report["seconds"][stage] >= 0
    assert report["peak_rss_mib"] > 0
    assert report["parameters"]["trainable"] < report["parameters"]["total"]  # LoRA
    written = json.loads((trained["output"] / SERVING_FILE).read_text())
    assert written["scoring"] == "listwise"
    # The fusion was chosen on questions of its own, written for serving, and its figures are
    # reported on the others with an interval for the gain.
    fusion = report["fusion"]
    assert (written["fusion"], written["fusion_weight"]) == (fusion["chosen"], fusion["weight"])
    assert written["chosen_on"]["queries"] == fusion["on"]["queries"] \
        == report["split"]["fusion_queries"] > 0
    # The chosen weight's smoothed figure (the mean over its neighbouring weights) is the best
    # of the table's; its own MAP is reported.
    chosen = f"{fusion['weight']:.2f}"
    assert fusion["smoothed"][fusion["chosen"]][chosen] == max(
        v for row in fusion["smoothed"].values() for v in row.values())
    assert fusion["on"]["map"] == fusion["table"][fusion["chosen"]][chosen]
    row = fusion["table"][fusion["chosen"]]
    near = [v for w, v in row.items() if abs(float(w) - fusion["weight"]) <= 0.1 + 1e-9]
    assert fusion["smoothed"][fusion["chosen"]][chosen] == pytest.approx(sum(near) / len(near),
                                                                          abs=2e-4)
    # Every reported query is one of the reported file's labelled queries, read apart from the
    # trainer, and none is a question the fusion was chosen on.
    reported = read_pairs(report["reported_file"], "eedi")
    assert report["fine_tuned"]["none"]["queries"] == report["split"]["evaluated_queries"] \
        == len({p.query for p in reported}) > 0
    assert not {p.group for p in reported} & set(report["validation_groups"])
    served = report["fine_tuned"]["served"]
    assert served["fusion"] == fusion["chosen"]
    assert 0 <= served["recall_at_1"] <= 1
    gain = report["fine_tuned"]["gain"]
    assert gain["low"] <= gain["gain"] <= gain["high"]
    assert gain["gain"] == pytest.approx(served["map"] - report["retrieval_only"]["map"],
                                         abs=2e-4)
    # _config sets RANKD_RERANKER_DTYPE float32: serving and the evaluation read it so.
    assert report["fine_tuned"]["dtype"] == "float32"
    assert report["precision"]["serving"].split()[0] == "float32"
    carried = report["fusion"]["carried"]
    assert carried["queries"] == report["split"]["fusion_queries"]
    assert carried["splits"] > 0
    assert -1 <= carried["gain"] <= 1


def test_no_validation_or_test_question_is_trained_on(trained: dict[str, Any]) -> None:
    report = trained["report"]
    trained_groups = set(report["trained_groups"])
    validation_groups = set(report["validation_groups"])
    test_groups = set(report["test_groups"])
    assert trained_groups
    assert validation_groups
    assert test_groups
    assert not trained_groups & (validation_groups | test_groups)
    assert not validation_groups & test_groups
    assert report["reported_on"] == "test"
    with Path(report["reported_file"]).open(newline="", encoding="utf-8") as fh:
        written = {row["QuestionId"] for row in csv.DictReader(fh)}
    assert written
    assert written <= test_groups
    # The fusion's questions are validation's, written beside it.
    with (trained["output"] / "validation.csv").open(newline="", encoding="utf-8") as fh:
        chose = {row["QuestionId"] for row in csv.DictReader(fh)}
    assert chose
    assert chose <= validation_groups


@pytest.mark.parametrize("scoring", [Scoring.LISTWISE, Scoring.POINTWISE])
async def test_training_prompts_are_the_prompts_the_service_renders(
        scoring: Scoring, tiny_lm: Path, settings_factory: Any) -> None:
    settings: Settings = settings_factory(reranker_backend="transformers",
                                          reranker_model=str(tiny_lm), reranker_scoring=scoring,
                                          default_candidates=CANDIDATES)
    query = "Question about fractions: adds the numerators and adds the denominators"
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": query, "debug": True,
                                                     "collection": SAMPLE_COLLECTION})
        assert response.status_code == 200, response.text
        body = response.json()
    tokenizer = load_tokenizer(str(tiny_lm))
    builder = PromptBuilder(tokenizer, settings.reranker, SAMPLE_INSTRUCTION)
    orders = body["debug"]["orders"]
    texts = {r["id"]: r["text"] for r in body["results"]}
    if scoring is Scoring.POINTWISE:
        ids = [o["candidate_ids"][0] for o in orders]  # one prompt per candidate
        reads = builder.pointwise_reads(builder.task(query, [Hit(i, texts[i], 0.0)
                                                             for i in ids]))
        assert len(reads) == len(orders) == CANDIDATES
        for read, order in zip(reads, orders, strict=True):
            assert order["labels"] == ["yes", "no"]
            assert read.prompt_token_ids == list(
                tokenizer(order["prompt"], add_special_tokens=False)["input_ids"])
            assert read.label_token_ids == order["label_token_ids"]
        return
    forward = orders[0]
    task = builder.task(query, [Hit(i, texts[i], 0.0) for i in forward["candidate_ids"]])
    for order in orders:
        positions = [forward["candidate_ids"].index(i) for i in order["candidate_ids"]]
        read = builder.listwise_read(task, positions)
        assert read.prompt_token_ids == list(
            tokenizer(order["prompt"], add_special_tokens=False)["input_ids"])
        assert read.label_token_ids == order["label_token_ids"]


def test_candidates_keep_retrieval_order_or_are_shuffled_and_n_can_vary(
        tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm))
    pairs = read_pairs(eedi_csv, "eedi")[:40]
    entries = _entries()
    rows = [[Hit(e.id, e.text, 0.0) for e in
             [*[e for e in entries if e.id != p.positive_id][i:i + 2],
              next(e for e in entries if e.id == p.positive_id),
              *[e for e in entries if e.id != p.positive_id][i + 2:i + CANDIDATES + 4]]]
            for i, p in enumerate(pairs)]  # the positive retrieved third
    config = _config(tmp_path, tiny_lm)
    builder = PromptBuilder(tokenizer, config.reranker, SAMPLE_INSTRUCTION)
    kept, stats = build_examples(pairs, rows, {}, builder, config)
    assert stats.positive_retrieved == len(kept) == len(pairs)
    # Retrieval order, then reversed: the positive is label C, then the third from the end.
    assert {tuple(e.targets) for e in kept} == {(2, CANDIDATES - 3)}
    shuffled, _ = build_examples(pairs, rows, {}, builder,
                                 _config(tmp_path, tiny_lm,
                                         candidate_order=CandidateOrder.SHUFFLED))
    assert len({e.targets[0] for e in shuffled}) > 2
    assert all(e.targets[1] == len(e.reads[0].label_token_ids) - 1 - e.targets[0]
               for e in shuffled)
    alternate, _ = build_examples(pairs, rows, {}, builder,
                                  _config(tmp_path, tiny_lm,
                                          example_orders=ExampleOrders.ALTERNATE))
    # One order per example, taking turns: the positive is label C, then third from the end.
    assert [e.targets for e in alternate[:4]] == [[2], [CANDIDATES - 3], [2], [CANDIDATES - 3]]
    varied, _ = build_examples(pairs, rows, {}, builder,
                               _config(tmp_path, tiny_lm, min_candidates=3, candidates=8))
    sizes = {len(e.reads[0].label_token_ids) for e in varied}
    assert sizes <= set(range(3, 9))
    assert len(sizes) > 2
    pointwise, _ = build_examples(pairs, rows, {}, PromptBuilder(
        tokenizer, RerankerConfig(model=str(tiny_lm), scoring=Scoring.POINTWISE),
        SAMPLE_INSTRUCTION), _config(tmp_path, tiny_lm, scoring=Scoring.POINTWISE))
    assert all(len(e.reads) == CANDIDATES and e.targets == [2] for e in pointwise)


def test_random_negatives_replace_the_tail_and_keep_the_positive(
        tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    tokenizer = load_tokenizer(str(tiny_lm))
    pairs = read_pairs(eedi_csv, "eedi")[:30]
    entries = _entries()
    by_id = {e.id: Hit(e.id, e.text, 0.0) for e in entries}
    rows = _fixed_hits(pairs, entries)  # the positive first, then four retrieved negatives
    config = _config(tmp_path, tiny_lm, scoring=Scoring.POINTWISE, random_negatives=2)
    builder = PromptBuilder(tokenizer, config.reranker, SAMPLE_INSTRUCTION)
    mixed, stats = build_examples(pairs, rows, by_id, builder, config)
    assert len(mixed) == len(pairs)
    assert stats.random_negatives == 2 * len(pairs)
    assert all(e.targets == [0] for e in mixed)  # the positive keeps its place

    def shown(read: Any) -> str:
        """The catalogue entry a pointwise prompt asks about."""
        prompt = tokenizer.decode(read.prompt_token_ids)
        found = [e.id for e in entries if f"Candidate:\n{e.text}\n" in prompt]
        assert len(found) == 1
        return found[0]

    drawn = set()
    for example, row in zip(mixed, rows, strict=True):
        ids = [shown(read) for read in example.reads]
        assert ids[:3] == [h.id for h in row[:3]]  # the head as retrieved
        assert not set(ids[3:]) & {h.id for h in row}  # drawn from outside the list
        assert len(set(ids)) == CANDIDATES
        drawn |= set(ids[3:])
    assert len(drawn) > 10  # drawn, not a fixed pick
    again, _ = build_examples(pairs, rows, by_id, builder, config)
    assert [[r.prompt_token_ids for r in e.reads] for e in again] == \
        [[r.prompt_token_ids for r in e.reads] for e in mixed]
    with pytest.raises(RerankerTrainingError, match="random negatives must be between 0 and"):
        _config(tmp_path, tiny_lm, random_negatives=CANDIDATES).check()


@pytest.mark.parametrize("scoring", [Scoring.LISTWISE, Scoring.POINTWISE])
async def test_the_trained_model_serves_rank(scoring: Scoring, trained: dict[str, Any],
                                             trained_pointwise: dict[str, Any],
                                             settings_factory: Any) -> None:
    run = trained if scoring is Scoring.LISTWISE else trained_pointwise
    # Only the model: the scoring mode, the fusion and N come from its rankd_reranker.json.
    settings: Settings = settings_factory(reranker_backend="transformers",
                                          reranker_model=str(run["output"]))
    written = json.loads((run["output"] / SERVING_FILE).read_text())
    assert written["candidates"] == CANDIDATES != settings.default_candidates
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": "one half plus one third",
                                                     "collection": SAMPLE_COLLECTION,
                                                     "top_k": 10, "debug": True})
        ready = (await client.get("/ready")).json()
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["reranked"] is True
    assert sum(r["rerank_score"] is not None for r in body["results"]) == CANDIDATES
    assert body["fusion"]["method"] == written["fusion"] == run["report"]["fusion"]["chosen"]
    if written["fusion"] != "consensus":
        assert body["fusion"]["rerank_weight"] == pytest.approx(1 - written["fusion_weight"])
    if scoring is Scoring.POINTWISE:
        assert body["fusion"]["agreement"] is None  # no positions to disagree over
        assert all(o["labels"] == ["yes", "no"] for o in body["debug"]["orders"])
    detail = ready["components"]["reranker"]["detail"]
    assert (f"served as trained ({SERVING_FILE}: {scoring} scoring, {CANDIDATES} candidates, "
            f"fusion {written['fusion']}") in detail


@pytest.mark.parametrize("scoring", [Scoring.LISTWISE, Scoring.POINTWISE])
def test_rankd_eval_reproduces_the_reported_map(scoring: Scoring, trained: dict[str, Any],
                                                trained_pointwise: dict[str, Any],
                                                sample_index: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    run = trained if scoring is Scoring.LISTWISE else trained_pointwise
    report = run["report"]
    validation = report["reported_file"]
    # The server computes in the dtype the trainer evaluated in: the training config's, float32
    # here on any CPU (bf16 sums depend on the batch, and the tiny model's scores are near-ties
    # that such differences reorder). The trained fusion ("served") is read from the model's
    # rankd_reranker.json; the other two are set explicitly, over it.
    dtype = run["config"].reranker.dtype
    for fusion in ("none", "consensus", "served"):
        chosen = {} if fusion == "served" else {"fusion": fusion,
                                                 "fusion_weight": DEFAULT_FUSION_WEIGHT}
        settings = Settings(index_dir=sample_index, embedder_device="cpu",
                            reranker={"backend": "transformers", "dtype": dtype,
                                      "batch_size": _pass_size(scoring),
                                      "model": str(run["output"]), **chosen})
        with serve_in_thread(settings) as url:
            assert main(["batch", "--url", url, "--quiet", "--input", validation, "--format",
                         "eedi", "--output", str(tmp_path / f"{fusion}.jsonl")]) == 0
        capsys.readouterr()
        assert main(["eval", "--submission", str(tmp_path / f"{fusion}.submission.csv"),
                     "--labels", validation, "--format", "eedi", "--json",
                     str(tmp_path / "eval.json")]) == 0
        evaluated = json.loads((tmp_path / "eval.json").read_text())
        assert evaluated["map"] == pytest.approx(report["fine_tuned"][fusion]["map"], abs=1e-4)


def test_bad_options_are_refused_before_anything_loads(tmp_path: Path, tiny_lm: Path) -> None:
    with pytest.raises(RerankerTrainingError, match=r"candidates .* exceeds the 26 labels"):
        _config(tmp_path, tiny_lm, candidates=30).check()
    with pytest.raises(RerankerTrainingError, match="candidates must be at least 2"):
        _config(tmp_path, tiny_lm, candidates=1).check()
    with pytest.raises(RerankerTrainingError, match="min candidates must be 0"):
        _config(tmp_path, tiny_lm, min_candidates=9).check()


def test_the_cli_names_a_bad_setting_in_one_line(tmp_path: Path, eedi_csv: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # Every bad value at once, one line each, read as the service reads them (any case).
    monkeypatch.setenv("RANKD_RERANKER_ORDERS", "0")
    monkeypatch.setenv("rankd_reranker_dtype", "float8")
    code = main(["train-reranker", "--train", str(eedi_csv), "--format", "eedi", "--catalog",
                 str(sample_catalog_path()), "--output", str(tmp_path / "out")])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "rankd train-reranker: rankd: invalid configuration:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "RANKD_RERANKER_DTYPE", "RANKD_RERANKER_ORDERS"]


def test_full_fine_tuning_is_the_default(tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    recipe = RerankerTrainingConfig(output_dir=tmp_path)  # docs/fine-tuning.md's budget recipe
    assert (recipe.method, recipe.train_layers, recipe.example_orders) == (
        TuningMethod.FULL, 8, ExampleOrders.ALTERNATE)
    assert (recipe.candidate_order, recipe.missing_positive, recipe.learning_rate) == (
        CandidateOrder.RETRIEVAL, MissingPositive.SKIP, 3e-4)
    config = _config(tmp_path / "full", tiny_lm, method=TuningMethod.FULL, examples=8, epochs=1,
                     curve_points=0, eval_queries=4)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi")
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_a_run_without_the_base_evaluation_keeps_a_curve_on_its_subset(
        tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    config = _config(tmp_path / "arm", tiny_lm, examples=16, epochs=1, curve_points=2,
                     curve_queries=4, base_eval=False)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi")
    assert report["base"] is None
    assert report["split"]["curve_queries"] < report["fine_tuned"]["none"]["queries"]
    curve = report["learning_curve"]
    assert len(curve) == 3  # two points during training and the written model, on the subset
    assert all(point["none"]["queries"] == report["split"]["curve_queries"] for point in curve)


def test_lora_on_the_last_layers_only(tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    config = _config(tmp_path / "lora1", tiny_lm, lora_layers=1, examples=8, epochs=1,
                     curve_points=0, eval_queries=4)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi")
    every = _config(tmp_path / "lora2", tiny_lm, examples=8, epochs=1, curve_points=0,
                    eval_queries=4)
    whole = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), every, eedi_csv, "eedi")
    # The tiny model has two layers: LoRA on one trains half the adapter weights.
    assert 0 < report["parameters"]["trainable"] < whole["parameters"]["trainable"]


def test_the_written_scores_reproduce_the_report_through_the_fusion_sweep(
        trained: dict[str, Any]) -> None:
    from bench.fusion_sweep import read_dump, sweep
    from reranker.training import TEST_SCORES_FILE

    report = trained["report"]
    header, queries = read_dump(trained["output"] / TEST_SCORES_FILE)
    assert header["queries"] == len(queries) == report["fine_tuned"]["none"]["queries"]
    rows = sweep(queries, [0.5])
    assert rows["retrieval only"]["MAP@25"] == pytest.approx(report["retrieval_only"]["map"],
                                                             abs=1e-4)
    assert rows["consensus[spearman] w=0.5"]["MAP@25"] == pytest.approx(
        report["fine_tuned"]["consensus"]["map"], abs=1e-4)
    assert rows["reranker alone (mean over orders)"]["MAP@25"] == pytest.approx(
        report["fine_tuned"]["none"]["map"], abs=1e-4)


@pytest.mark.parametrize("scoring", [None, "listwise"])
def test_the_shipped_defaults_run_end_to_end(scoring: str | None, tmp_path: Path,
                                             tiny_lm: Path, eedi_csv: Path,
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """`rankd train-reranker` with every option at its default (the pointwise recipe, or
    listwise by --scoring) but the model, on a queue far smaller than the evaluation's prompts:
    it finishes, writes the full report and the settings `rankd serve` reads."""
    monkeypatch.setenv("RANKD_RERANKER_MODEL", str(tiny_lm))
    monkeypatch.setenv("RANKD_RERANKER_MAX_QUEUE_DEPTH", "16")
    output = tmp_path / "out"
    args = ["train-reranker", "--train", str(eedi_csv), "--format", "eedi", "--catalog",
            str(sample_catalog_path()), "--output", str(output), "--quiet"]
    assert main([*args, *(["--scoring", scoring] if scoring else [])]) == 0
    summary = json.loads(capsys.readouterr().out)
    report = json.loads((output / "training_report.json").read_text())
    assert report["status"] == "complete"
    assert summary["scoring"] == report["scoring"] == (scoring or "pointwise")
    prompts_per_query = 10 if report["scoring"] == "pointwise" else 2
    evaluated = report["split"]["fusion_queries"] + report["split"]["evaluated_queries"]
    assert evaluated * prompts_per_query > 16  # more than the queue holds at once
    assert report["config"]["examples"] == 0
    assert report["config"]["train_layers"] == 8
    assert len(report["learning_curve"]) == 4  # three points during training, then the end
    assert report["precision"]["training"].split()[0] == (
        "bfloat16" if report["precision"]["serving"].startswith("bfloat16") else "float32")
    written = json.loads((output / SERVING_FILE).read_text())
    assert written["scoring"] == report["scoring"]
    assert written["fusion"] == report["fusion"]["chosen"]
    assert (output / "test_scores.jsonl").is_file()
    assert (output / "fusion_scores.jsonl").is_file()


def test_the_model_is_written_before_evaluation_and_a_partial_report_with_it(
        tmp_path: Path, tiny_lm: Path, eedi_csv: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import reranker.training as training

    def fail(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("evaluation failed")

    monkeypatch.setattr(training.RerankEvaluator, "score", fail)
    config = _config(tmp_path / "out", tiny_lm, examples=8, epochs=1, curve_points=0,
                     base_eval=False)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi")
    output = tmp_path / "out"
    assert (output / "model.safetensors").is_file()
    assert json.loads((output / SERVING_FILE).read_text())["scoring"] == "listwise"
    partial = json.loads((output / "training_report.json").read_text())
    assert partial["status"] == "trained; evaluating"
    assert partial["train_loss"]
    assert partial["retrieval_only"]["queries"] > 0


def _fold_retriever(eedi_csv: Path, output: Path, fold: int, seed: int = 42) -> str:
    """`rankd train-retriever --folds 2 --fold FOLD`: a short run on the tiny Eedi file."""
    assert main(["train-retriever", "--train", str(eedi_csv), "--format", "eedi", "--catalog",
                 str(sample_catalog_path()), "--output", str(output), "--device", "cpu",
                 "--epochs", "1", "--batch-size", "8", "--validation-fraction", "0.25",
                 "--folds", "2", "--fold", str(fold), "--seed", str(seed), "--quiet"]) == 0
    return str(output)


@pytest.mark.slow
def test_cross_fitted_candidates_come_from_the_retriever_that_left_their_question_out(
        tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    from reranker.training.data import fold_retrievers, retrieve_candidates, split_for_training
    from retriever import Embedder, build_collection, load_collection
    from retriever.pairs import fold_of

    pairs = read_pairs(eedi_csv, "eedi")
    models = [_fold_retriever(eedi_csv, tmp_path / f"fold-{fold}", fold) for fold in (1, 0)]
    config = _config(tmp_path / "out", tiny_lm, fold_retrievers=tuple(models), examples=0,
                     epochs=1, curve_points=0, base_eval=False, scoring=Scoring.POINTWISE)
    data = split_for_training(pairs, config)
    for fold, model in enumerate(sorted(models)):
        report = json.loads((Path(model) / "training_report.json").read_text())
        assert report["cross_fit"]["fold"] == fold
        # It trained on every training question but its fold's.
        assert report["pairs"]["train"] == sum(fold_of(p.group, 2, 42) != fold
                                               for p in data.split.train)

    folds = fold_retrievers(config)
    assert [f.fold for f in folds] == [0, 1]
    train_hits, _ = retrieve_candidates(_entries(), data, config, folds)
    for retriever in folds:
        embedder = Embedder.load(retriever.model, "cpu")
        catalogue = load_collection(build_collection(_entries(), embedder, tmp_path / f"i{retriever.fold}",
                                                     "catalogue", show_progress=False))
        rows = [i for i, p in enumerate(data.train_pairs) if fold_of(p.group, 2, 42) == retriever.fold]
        assert rows
        expected = catalogue.search(embedder.encode([data.train_pairs[i].query for i in rows]),
                                    CANDIDATES)
        assert [[h.id for h in train_hits[i]] for i in rows] == [[h.id for h in e] for e in expected]

    report = train_reranker(pairs, _entries(), config, eedi_csv, "eedi")
    assert report["status"] == "complete"
    cross_fit = report["retriever"]["cross_fit"]
    assert [c["model"] for c in cross_fit] == sorted(models)
    assert sum(c["pairs"] for c in cross_fit) == len(data.train_pairs) == report["examples"]["pairs"]

    # A retriever of another split, the same fold twice, one fold, or no fold: refused, named.
    other = _fold_retriever(eedi_csv, tmp_path / "seed-7", 0, seed=7)
    for retrievers, message in [((models[0], other), "has seed 7, this run 42"),
                                ((models[0], models[0]), "both left out fold 1"),
                                ((models[0],), "needs one retriever per fold"),
                                ((models[0], str(tiny_lm)), "not a `rankd train-retriever`")]:
        refused = _config(tmp_path / "refused", tiny_lm, fold_retrievers=retrievers)
        with pytest.raises(RerankerTrainingError, match=message):
            train_reranker(pairs, _entries(), refused, eedi_csv, "eedi")


def test_the_benches_read_a_runs_own_split_and_n(trained: dict[str, Any], eedi_csv: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """bench/gain_by_seen.py takes the split from the run's report (its test questions are
    what it reports) and bench/fusion_choice.py the N from its score file's header."""
    from bench.fusion_choice import main as fusion_choice
    from bench.gain_by_seen import main as gain_by_seen

    report = trained["report"]
    assert gain_by_seen(["--train", str(eedi_csv), str(trained["output"])]) == 0
    printed = capsys.readouterr().out
    queries = report["split"]["evaluated_queries"]
    assert f"{queries} queries, gain {report['fine_tuned']['gain']['gain']:+.4f}" in printed
    assert fusion_choice([str(trained["output"]), "--splits", "3"]) == 0
    assert capsys.readouterr().out


def test_the_trained_model_on_its_own_retriever_reproduces_its_report(
        trained: dict[str, Any], eedi_csv: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bench/reranker_on_retriever.py, which measures a trained reranker on another retriever's
    candidates, given the run's own retriever: the same test questions, the same fusion chosen
    on the same validation questions, and the run's figures on them."""
    from bench.reranker_on_retriever import main as reranker_on_retriever

    report = trained["report"]
    # The passes the run evaluated with (_config), as the service reads its settings.
    monkeypatch.setenv("RANKD_RERANKER_DTYPE", "float32")
    monkeypatch.setenv("RANKD_RERANKER_BATCH_SIZE", str(_pass_size(Scoring.LISTWISE)))
    monkeypatch.setenv("RANKD_RERANKER_DEVICE", "cpu")
    assert reranker_on_retriever([str(trained["output"]), "--retriever",
                                  report["retriever"]["model"], "--train", str(eedi_csv),
                                  "--catalog", str(sample_catalog_path()),
                                  "--output", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "reranker_on_retriever.json").read_text())
    served = json.loads((trained["output"] / SERVING_FILE).read_text())
    assert result["validation"]["chosen"]["fusion"] == served["fusion"]
    assert result["validation"]["chosen"]["weight"] == served["fusion_weight"]
    assert result["validation"]["chosen"]["map"] == served["chosen_on"]["map"]
    test = result["test"]
    assert test["queries"] == report["split"]["evaluated_queries"]
    assert test["retrieval"]["map"] == report["retrieval_only"]["map"]
    assert test["reranker_alone"]["map"] == report["fine_tuned"]["none"]["map"]
    assert test["chosen_fusion"]["map"] == report["fine_tuned"]["served"]["map"]
    assert test["chosen_fusion"]["gain"] == report["fine_tuned"]["gain"]
    assert test["trained_fusion"] == test["chosen_fusion"]
    parts = test["retrieval"]
    assert parts["seen"] + parts["unseen"] == parts["queries"] == test["queries"]
    assert (tmp_path / "test_scores.jsonl").read_text() == \
        (trained["output"] / "test_scores.jsonl").read_text().replace(
            "rankd train-reranker", "bench/reranker_on_retriever.py")
    # The test questions alone, under the run's fusion: the same figures, no choice made.
    alone = tmp_path / "trained-fusion"
    assert reranker_on_retriever([str(trained["output"]), "--retriever",
                                  report["retriever"]["model"], "--train", str(eedi_csv),
                                  "--catalog", str(sample_catalog_path()),
                                  "--output", str(alone), "--trained-fusion"]) == 0
    cheaper = json.loads((alone / "reranker_on_retriever.json").read_text())
    assert "chosen" not in cheaper["validation"]
    assert "chosen_fusion" not in cheaper["test"]
    assert cheaper["test"]["trained_fusion"] == test["trained_fusion"]
    assert cheaper["validation"]["retrieval"] == result["validation"]["retrieval"]
    assert not (alone / "fusion_scores.jsonl").exists()
