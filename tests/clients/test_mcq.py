"""`rankd batch --format mcq` and `rankd eval --format mcq` against the real app with the tiny
LM (transformers backend) on a loopback port."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from clients.evaluate import evaluate, read_labels, read_submission
from clients.queries import InputError, read_queries
from rankd.cli import main
from tests.support.apps import serve_in_thread

ROWS = [
    {"id": "0", "prompt": "What is 7 to the power 0?", "A": "0", "B": "1", "C": "7", "D": "49",
     "E": "70", "answer": "B"},
    {"id": "1", "prompt": "Which number is prime?", "A": "1", "B": "4", "C": "7", "D": "9",
     "E": "15", "answer": "C"},
    {"id": "2", "prompt": "What is the median of 7, 2, 9?", "A": "2", "B": "6", "C": "7",
     "D": "9", "E": "", "answer": "C"},
]


@pytest.fixture
def mcq_file(tmp_path: Path) -> Path:
    path = tmp_path / "exam.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "prompt", "A", "B", "C", "D", "E", "answer"])
        writer.writeheader()
        writer.writerows(ROWS)
    return path


def test_reader_keeps_options_in_order(mcq_file: Path) -> None:
    queries = read_queries(mcq_file, "mcq")
    assert [q.id for q in queries] == ["0", "1", "2"]
    assert queries[0].options == ("0", "1", "7", "49", "70")
    assert queries[2].options == ("2", "6", "7", "9")  # a trailing empty option is dropped
    assert queries[1].relevant == ("C",)


def test_a_gap_in_the_options_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "gap.csv"
    path.write_text("id,prompt,A,B,C,D,E\n1,q,a,,c,,\n")
    with pytest.raises(InputError, match="empty option"):
        read_queries(path, "mcq")


def test_batch_then_eval_on_an_mcq_file(mcq_file: Path, tmp_path: Path, settings_factory: Any,
                                        tiny_lm: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm))
    output = tmp_path / "answers.jsonl"
    with serve_in_thread(settings) as url:
        code = main(["batch", "--url", url, "--input", str(mcq_file), "--format", "mcq",
                     "--output", str(output), "--quiet", "--concurrency", "2"])
    assert code == 0
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["id"] for r in records] == ["0", "1", "2"]
    for record, row in zip(records, ROWS, strict=True):
        options = record["response"]["options"]
        assert sum(o["probability"] for o in options) == pytest.approx(1.0)
        assert {o["label"]: o["text"] for o in options} == {
            label: row[label] for label in "ABCDE" if row[label]}
    submission = tmp_path / "answers.submission.csv"
    lines = submission.read_text().splitlines()
    assert lines[0] == "id,prediction"
    predictions = {line.split(",")[0]: line.split(",")[1].split() for line in lines[1:]}
    assert all(len(p) == 3 for p in predictions.values())
    assert predictions["0"] == records[0]["response"]["ranking"][:3]

    capsys.readouterr()
    assert main(["eval", "--submission", str(submission), "--labels", str(mcq_file),
                 "--format", "mcq", "--json", str(tmp_path / "report.json")]) == 0
    printed = capsys.readouterr().out
    # The same figures computed here from the submission and the answers.
    expected = evaluate(read_submission(submission), read_labels(mcq_file, "mcq"), fmt="mcq",
                        map_k=3, ks=(1, 3))
    assert f"MAP@3: {expected.map:.4f}" in printed
    assert f"accuracy: {expected.recall[1]:.4f}" in printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["map_k"] == 3
    assert report["scored"] == 3


def test_mcq_metrics_by_hand() -> None:
    labels = {"a": ["B"], "b": ["C"], "c": ["A"], "d": ["D"]}
    submission = {"a": ["B", "A", "C"], "b": ["A", "C", "B"], "c": ["B", "C", "A"],
                  "d": ["A", "B", "C"]}
    report = evaluate(submission, labels, fmt="mcq", map_k=3, ks=(1, 3))
    assert report.map == pytest.approx((1 + 1 / 2 + 1 / 3 + 0) / 4)
    assert report.recall[1] == pytest.approx(1 / 4)
    assert report.recall[3] == pytest.approx(3 / 4)
