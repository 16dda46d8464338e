"""`rankd train-reranker` on the tiny random model: the loss, the written model, the prompts, the
split, and `rankd eval` reproducing the reported MAP@25."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from rankd.cli import main
from reranker.backends.transformers_backend import TransformersBackend
from reranker.config import RerankerConfig
from reranker.prompt import load_tokenizer
from reranker.training import (
    PromptBuilder,
    RerankerTrainingConfig,
    RerankerTrainingError,
    TuningMethod,
    build_examples,
    listwise_loss,
    train_reranker,
)
from retriever import read_catalog
from retriever.catalog import CatalogEntry
from retriever.data import (
    SAMPLE_COLLECTION,
    SAMPLE_ID_COLUMN,
    SAMPLE_INSTRUCTION,
    SAMPLE_TEXT_COLUMN,
    sample_catalog_path,
)
from retriever.index import Hit
from retriever.training import read_pairs
from service.settings import Settings
from tests.retriever.test_training import write_eedi_csv
from tests.support.apps import app_client, serve_in_thread

CANDIDATES = 5


def _entries() -> list[CatalogEntry]:
    return read_catalog(sample_catalog_path(), SAMPLE_ID_COLUMN, SAMPLE_TEXT_COLUMN)


@pytest.fixture(scope="module")
def eedi_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_eedi_csv(tmp_path_factory.mktemp("eedi") / "train.csv", _entries())


def _config(output: Path, tiny_lm: Path, **overrides: Any) -> RerankerTrainingConfig:
    values: dict[str, Any] = dict(
        output_dir=output, reranker=RerankerConfig(model=str(tiny_lm)), device="cpu",
        candidates=CANDIDATES, examples=200, epochs=3, learning_rate=1e-2,
        gradient_accumulation=2, lora_rank=8, validation_fraction=0.25, eval_queries=1000,
        curve_points=1, progress=False)
    values.update(overrides)
    return RerankerTrainingConfig(**values)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path,
            eedi_csv: Path) -> dict[str, Any]:
    output = tmp_path_factory.mktemp("reranker") / "model"
    config = _config(output, tiny_lm)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi",
                            instruction=SAMPLE_INSTRUCTION)
    return {"report": report, "output": output, "config": config}


def _mean_loss(model_dir: Path, tokenizer: Any, examples: list[Any]) -> float:
    import torch

    config = RerankerConfig(model=str(model_dir), device="cpu")
    loaded = TransformersBackend.load(config, tokenizer)
    model, pad = loaded.model, loaded.pad_token_id
    with torch.no_grad():
        losses = [listwise_loss(model, {"prompts": [e.prompt_token_ids],
                                        "label_ids": [e.label_token_ids],
                                        "targets": torch.tensor([e.target])}, pad, "cpu").item()
                  for e in examples]
    return sum(losses) / len(losses)


def test_training_lowers_the_listwise_loss(trained: dict[str, Any], tiny_lm: Path,
                                           eedi_csv: Path) -> None:
    report = trained["report"]
    tokenizer = load_tokenizer(str(tiny_lm))
    builder = PromptBuilder(tokenizer, RerankerConfig(model=str(tiny_lm)), SAMPLE_INSTRUCTION)
    pairs = [p for p in read_pairs(eedi_csv, "eedi") if p.group in set(report["trained_groups"])]
    entries = _entries()
    # Candidates as the positive plus the next entries of the catalogue, in a fixed order.
    hits = [[Hit(e.id, e.text, 0.0) for e in
             [next(e for e in entries if e.id == p.positive_id),
              *[e for e in entries if e.id != p.positive_id][i:i + CANDIDATES - 1]]]
            for i, p in enumerate(pairs)]
    examples, _ = build_examples(pairs, hits, {}, builder, trained["config"])
    before = _mean_loss(tiny_lm, tokenizer, examples)
    after = _mean_loss(trained["output"], tokenizer, examples)
    assert after < before - 0.1, (before, after)
    losses = [row["loss"] for row in report["train_loss"]]
    assert losses, report
    assert sum(losses[-3:]) / len(losses[-3:]) < sum(losses[:3]) / len(losses[:3])


def test_the_report_has_every_stage(trained: dict[str, Any]) -> None:
    report = trained["report"]
    assert report["status"] == "complete"
    for name in ("retrieval_only", "base", "fine_tuned"):
        figures = report[name] if name == "retrieval_only" else report[name]["none"]
        assert 0 <= figures["map"] <= 1
        assert figures["queries"] == figures["seen"] + figures["unseen"] > 0
    assert set(report["fine_tuned"]) == {"none", "rrf"}
    curve = report["learning_curve"]
    assert [point["examples"] for point in curve] == sorted(point["examples"] for point in curve)
    assert len(curve) == 3  # the base, one point during training, the written model
    assert curve[0]["none"] == report["base"]["none"]
    assert curve[-1]["none"] == report["fine_tuned"]["none"]
    assert report["examples"]["pairs"] == report["examples"]["positive_in_top_n"] + \
        report["examples"]["positive_inserted"] + report["examples"]["skipped_missing_positive"]
    for stage in ("retrieval", "evaluate_base", "train", "save", "evaluate_fine_tuned", "total"):
        assert report["seconds"][stage] >= 0
    assert report["peak_rss_mib"] > 0
    assert report["parameters"]["trainable"] < report["parameters"]["total"]  # LoRA


def test_no_validation_question_is_trained_on(trained: dict[str, Any]) -> None:
    report = trained["report"]
    trained_groups = set(report["trained_groups"])
    validation_groups = set(report["validation_groups"])
    assert trained_groups
    assert validation_groups
    assert not trained_groups & validation_groups
    with Path(report["validation_file"]).open(newline="", encoding="utf-8") as fh:
        written = {row["QuestionId"] for row in csv.DictReader(fh)}
    assert written
    assert written <= validation_groups


async def test_training_prompts_are_the_prompts_the_service_renders(
        trained: dict[str, Any], tiny_lm: Path, settings_factory: Any) -> None:
    settings: Settings = settings_factory(reranker_backend="transformers",
                                          reranker_model=str(tiny_lm),
                                          default_candidates=CANDIDATES)
    query = "Question about fractions: adds the numerators and adds the denominators"
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": query, "debug": True,
                                                     "collection": SAMPLE_COLLECTION})
        assert response.status_code == 200, response.text
        body = response.json()
    tokenizer = load_tokenizer(str(tiny_lm))
    builder = PromptBuilder(tokenizer, settings.reranker, SAMPLE_INSTRUCTION)
    forward = body["debug"]["orders"][0]
    texts = {r["id"]: r["text"] for r in body["results"]}
    hits = [Hit(i, texts[i], 0.0) for i in forward["candidate_ids"]]
    for order in body["debug"]["orders"]:
        positions = [forward["candidate_ids"].index(i) for i in order["candidate_ids"]]
        pair = read_pairs_for(query, hits[positions[0]].id)
        example = builder.example(pair, hits, positions)
        assert example.text == order["prompt"]
        assert example.prompt_token_ids == list(
            tokenizer(order["prompt"], add_special_tokens=False)["input_ids"])
        assert example.label_token_ids == order["label_token_ids"]


def read_pairs_for(query: str, positive_id: str) -> Any:
    from retriever.training import TrainingPair

    return TrainingPair("q", "g", query, positive_id)


async def test_the_trained_model_serves_rank(trained: dict[str, Any],
                                             settings_factory: Any) -> None:
    settings: Settings = settings_factory(reranker_backend="transformers",
                                          reranker_model=str(trained["output"]),
                                          default_candidates=CANDIDATES)
    async with app_client(settings) as (_, client):
        response = await client.post("/rank", json={"query": "one half plus one third",
                                                     "collection": SAMPLE_COLLECTION})
    assert response.status_code == 200, response.text
    assert response.json()["reranked"] is True


def test_rankd_eval_reproduces_the_reported_map(trained: dict[str, Any], sample_index: Path,
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    report = trained["report"]
    settings = Settings(index_dir=sample_index, device="cpu", default_candidates=CANDIDATES,
                        rerank_fusion="none",
                        reranker={"backend": "transformers", "model": str(trained["output"])})
    validation = report["validation_file"]
    with serve_in_thread(settings) as url:
        assert main(["batch", "--url", url, "--quiet", "--input", validation, "--format",
                     "eedi", "--output", str(tmp_path / "run.jsonl")]) == 0
    capsys.readouterr()
    assert main(["eval", "--submission", str(tmp_path / "run.submission.csv"), "--labels",
                 validation, "--format", "eedi", "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["map"] == pytest.approx(report["fine_tuned"]["none"]["map"], abs=1e-4)


def test_bad_options_are_refused_before_anything_loads(tmp_path: Path, tiny_lm: Path) -> None:
    with pytest.raises(RerankerTrainingError, match=r"candidates .* exceeds the 26 labels"):
        _config(tmp_path, tiny_lm, candidates=30).check()
    with pytest.raises(RerankerTrainingError, match="candidates must be at least 2"):
        _config(tmp_path, tiny_lm, candidates=1).check()


def test_the_cli_names_a_bad_setting_in_one_line(tmp_path: Path, eedi_csv: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("RANKD_RERANKER_ORDERS", "0")
    code = main(["train-reranker", "--train", str(eedi_csv), "--format", "eedi", "--catalog",
                 str(sample_catalog_path()), "--output", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("rankd train-reranker: RANKD_RERANKER_ORDERS:")
    assert "\n" not in err


def test_full_fine_tuning_is_an_option(tmp_path: Path, tiny_lm: Path, eedi_csv: Path) -> None:
    config = _config(tmp_path / "full", tiny_lm, method=TuningMethod.FULL, examples=8, epochs=1,
                     curve_points=0, eval_queries=4)
    report = train_reranker(read_pairs(eedi_csv, "eedi"), _entries(), config, eedi_csv, "eedi")
    assert report["parameters"]["trainable"] == report["parameters"]["total"]
    assert (tmp_path / "full" / "model.safetensors").is_file()
