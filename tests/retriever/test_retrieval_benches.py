"""The retrieval benches on a tiny Eedi-layout split: bench/hybrid_retrieval.py and
bench/test_report.py, with the real MiniLM embedder and BM25 (bm25s)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from retriever.data import sample_entries
from tests.retriever.test_training import write_eedi_csv


@pytest.fixture(scope="module")
def eedi_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("eedi-data")
    entries = sample_entries()
    write_eedi_csv(folder / "train.csv", entries)
    with (folder / "misconception_mapping.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["MisconceptionId", "MisconceptionName"])
        writer.writerows([entry.id, entry.text] for entry in entries)
    return folder


def _lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()
            if line.startswith("{")]


SPLIT = ["--validation-fraction", "0.3", "--test-fraction", "0.3"]


def test_an_embedder_fused_with_itself_is_the_embedder_alone(
        eedi_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.hybrid_retrieval import WEIGHTS
    from bench.hybrid_retrieval import main as hybrid

    assert hybrid(["--data", str(eedi_data), *SPLIT, "--model", "default",
                   "--fuse-with", "default", "--report-on", "test"]) == 0
    result = _lines(capsys)[-1]
    assert result["fused_with"] == "default"
    table = result["validation"]["table"]
    assert len(table) == len(WEIGHTS)
    # Equal ranks on both sides: every weight orders the catalogue as the embedder does.
    assert set(table.values()) == {result["validation"]["dense_alone"]}
    test = result["test"]
    assert test["queries"] > 0
    assert test["hybrid"] == test["dense_alone"] == test["other_alone"]
    assert test["gain"]["gain"] == 0


def test_bm25_fusion_reports_both_sides_and_agrees_with_the_test_report(
        eedi_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench.hybrid_retrieval import main as hybrid
    from bench.test_report import main as test_report

    assert hybrid(["--data", str(eedi_data), *SPLIT, "--model", "default"]) == 0
    result = _lines(capsys)[-1]
    validation = result["validation"]
    assert result["fused_with"] == "bm25"
    assert validation["dense_alone"] == validation["table"]["1.00"]
    assert validation["other_alone"] == validation["table"]["0.00"]
    assert validation["chosen"] == validation["table"][f"{result['chosen_weight']:.2f}"]
    assert "test" not in result  # the test questions only with --report-on test

    assert test_report(["--data", str(eedi_data), *SPLIT, "--split", "validation",
                        "default"]) == 0
    report = _lines(capsys)
    assert report[0]["split"] == "validation"
    assert report[0]["queries"] == validation["queries"]
    assert round(report[1]["map"], 4) == validation["dense_alone"]
