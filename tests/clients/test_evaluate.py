"""rankd eval: the metrics on cases worked out by hand, the file readers, and an end-to-end
evaluation of a submission written by the batch client."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clients.evaluate import evaluate, read_labels, read_submission
from clients.queries import InputError
from rankd.cli import main
from retriever.data import sample_queries_path
from retriever.evaluation import average_precision, ndcg, recall
from tests.clients.conftest import Server, read_jsonl

# ---------------------------------------------------------------- one query


def test_average_precision_with_one_relevant_id_is_the_reciprocal_rank() -> None:
    assert average_precision(["7", "3", "9"], ["7"], 25) == 1.0
    assert average_precision(["3", "9", "7"], ["7"], 25) == pytest.approx(1 / 3)
    assert average_precision(["3", "9"], ["7"], 25) == 0.0
    assert average_precision([], ["7"], 25) == 0.0
    # Position 26 is outside MAP@25, inside recall@50.
    row = [str(i) for i in range(100, 125)] + ["7"]
    assert average_precision(row, ["7"], 25) == 0.0
    assert recall(row, ["7"], 25) == 0.0
    assert recall(row, ["7"], 50) == 1.0


def test_duplicate_ids_keep_their_position_but_score_once() -> None:
    # "3 3 7": the repeated 3 pushes 7 to position 3, as the competition's apk counted it.
    assert average_precision(["3", "3", "7"], ["7"], 25) == pytest.approx(1 / 3)
    # "7 7 3": the relevant id repeated scores once: 1/1, not 1/1 + 2/2.
    assert average_precision(["7", "7", "3"], ["7"], 25) == 1.0
    # Two relevant ids, one repeated: hits at positions 1 and 3 -> (1/1 + 2/3) / 2.
    assert average_precision(["a", "a", "b"], ["a", "b"], 25) == pytest.approx((1 + 2 / 3) / 2)
    assert recall(["a", "a", "x"], ["a", "b"], 3) == 0.5
    # nDCG counts a repeated relevant id once: DCG 1, ideal 1 + 1/log2(3).
    assert ndcg(["a", "a"], ["a", "b"]) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_several_relevant_ids() -> None:
    ranked = ["x", "r1", "r2", "y"]
    relevant = ["r1", "r2", "r3"]
    # Hits at positions 2 and 3: (1/2 + 2/3) / min(3, k).
    assert average_precision(ranked, relevant, 10) == pytest.approx((1 / 2 + 2 / 3) / 3)
    assert average_precision(ranked, relevant, 2) == pytest.approx((1 / 2) / 2)
    assert recall(ranked, relevant, 2) == pytest.approx(1 / 3)
    assert recall(ranked, relevant, 3) == pytest.approx(2 / 3)
    dcg = 1 / math.log2(3) + 1 / math.log2(4)
    ideal = 1 + 1 / math.log2(3) + 1 / math.log2(4)
    assert ndcg(ranked, relevant) == pytest.approx(dcg / ideal)
    assert ndcg(["r1", "r2", "r3"], relevant) == 1.0


# ---------------------------------------------------------------- a submission


def test_missing_rows_score_zero_and_are_counted() -> None:
    submission = {"q1": ["a", "b", "c"], "q2": ["b", "a", "c"], "q3": ["x", "y"],
                  "extra": ["a"]}
    labels = {"q1": ["a"], "q2": ["c"], "q3": ["z"], "q4": ["w"], "unlabelled": []}
    report = evaluate(submission, labels, ks=(1, 2, 3, 5))
    assert report.map == pytest.approx((1 + 1 / 3 + 0 + 0) / 4)
    assert report.recall == {1: 0.25, 2: 0.25, 3: 0.5, 5: None}  # rows are at most 3 long
    assert (report.labelled, report.scored, report.missing, report.unlabelled) == (4, 3, 1, 1)
    assert report.missing_ids == ["q4"]
    assert report.depth == 3
    assert report.ndcg10 is None


def test_ties_in_scores_are_ranked_by_position_not_resorted(tmp_path: Path) -> None:
    path = tmp_path / "sub.jsonl"
    results = [{"id": "x", "score": 0.5}, {"id": "r", "score": 0.5}, {"id": "y", "score": 0.5}]
    path.write_text(json.dumps({"id": "q", "response": {"results": results}}) + "\n"
                    + json.dumps({"id": "q2", "ranked": ["r", "x"]}) + "\n"
                    + json.dumps({"id": "failed", "error": {"status": 503}}) + "\n",
                    encoding="utf-8")
    submission = read_submission(path)
    assert submission == {"q": ["x", "r", "y"], "q2": ["r", "x"]}  # the failed one is missing
    report = evaluate(submission, {"q": ["r"], "q2": ["r"], "failed": ["r"]}, fmt="jsonl",
                      map_k=25, ks=(1, 3), with_ndcg=True)
    assert report.map == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert report.recall == {1: pytest.approx(1 / 3), 3: pytest.approx(2 / 3)}
    assert report.ndcg10 == pytest.approx((1 / math.log2(3) + 1 + 0) / 3)
    assert report.missing == 1


def test_submission_and_label_files(tmp_path: Path, eedi_file: Path) -> None:
    csv_path = tmp_path / "sub.csv"
    csv_path.write_text("QuestionId_Answer,MisconceptionId\n10_A,1 5 9\n10_D,\n",
                        encoding="utf-8")
    assert read_submission(csv_path) == {"10_A": ["1", "5", "9"], "10_D": []}
    labels = read_labels(eedi_file, "eedi")
    assert labels == {"10_A": ["1"], "10_D": ["1"], "11_B": ["7"], "11_D": ["7"],
                      "12_A": ["16"]}
    solution = tmp_path / "solution.csv"
    solution.write_text("QuestionId_Answer,MisconceptionId\n10_A,1\n", encoding="utf-8")
    assert read_labels(solution, "eedi") == {"10_A": ["1"]}
    csv_path.write_text("QuestionId_Answer,MisconceptionId\n10_A,1\n10_A,2\n", encoding="utf-8")
    with pytest.raises(InputError, match="'10_A' appears twice"):
        read_submission(csv_path)
    bad = tmp_path / "labels.jsonl"
    bad.write_text('{"id": "q1"}\n', encoding="utf-8")
    with pytest.raises(InputError, match="needs 'id' and 'relevant'"):
        read_labels(bad, "jsonl")


# ---------------------------------------------------------------- end to end


def _reciprocal_rank(record: dict[str, object], label: str, k: int = 25) -> float:
    response = record["response"]
    assert isinstance(response, dict)
    for result in response["results"]:
        if result["id"] == label and result["rank"] <= k:
            return 1.0 / float(result["rank"])
    return 0.0


def test_eval_of_a_submission_made_by_the_batch_client(
        server: Server, eedi_file: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run.jsonl"
    assert main(["batch", "--url", server.url, "--quiet", "--no-rerank", "--input",
                 str(eedi_file), "--format", "eedi", "--output", str(output)]) == 0
    capsys.readouterr()
    report_path = tmp_path / "report.json"
    assert main(["eval", "--submission", str(tmp_path / "run.submission.csv"), "--labels",
                 str(eedi_file), "--format", "eedi", "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    labels = read_labels(eedi_file, "eedi")
    records = read_jsonl(output)
    expected_map = sum(_reciprocal_rank(r, labels[r["id"]][0]) for r in records) / len(records)
    assert report["map"] == pytest.approx(expected_map)
    assert report["map"] > 0  # the sample catalogue holds every label
    assert report["recall"]["25"] == pytest.approx(
        sum(_reciprocal_rank(r, labels[r["id"]][0]) > 0 for r in records) / len(records))
    assert report["recall"]["50"] is None  # a submission lists 25 ids
    assert (report["labelled"], report["scored"], report["missing"]) == (5, 5, 0)
    assert f"MAP@25: {report['map']:.4f}" in printed
    assert "recall@50: n/a (the submission lists at most 25 ids)" in printed


def test_eval_of_the_generic_format_from_batch_output(server: Server, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run.jsonl"
    assert main(["batch", "--url", server.url, "--quiet", "--no-rerank", "--input",
                 str(sample_queries_path()), "--format", "jsonl", "--output", str(output),
                 "--top-k", "10"]) == 0
    records = read_jsonl(output)
    del records[0]  # one query missing from the submission
    trimmed = tmp_path / "trimmed.jsonl"
    trimmed.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    capsys.readouterr()
    report_path = tmp_path / "report.json"
    assert main(["eval", "--submission", str(trimmed), "--labels", str(sample_queries_path()),
                 "--format", "jsonl", "--json", str(report_path), "--map-k", "10",
                 "--ks", "1,10,25"]) == 0
    report = json.loads(report_path.read_text())
    labels = read_labels(sample_queries_path(), "jsonl")
    expected = sum(_reciprocal_rank(r, labels[r["id"]][0], 10) for r in records) / len(labels)
    assert report["map"] == pytest.approx(expected)  # every sample query has one label
    assert report["missing"] == 1
    assert report["scored"] == len(labels) - 1
    assert report["ndcg10"] is not None
    assert 0 < report["ndcg10"] <= 1
    assert report["recall"]["25"] is None
    assert "nDCG@10:" in capsys.readouterr().out


def test_eval_reports_bad_files_as_usage_errors(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--submission", str(tmp_path / "none.csv"), "--labels",
                 str(sample_queries_path()), "--format", "jsonl"]) == 2
    assert "does not exist" in capsys.readouterr().err
