"""Query files: eedi (through the shared template), jsonl and csv, and their errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clients.queries import InputError, QueryFileOptions, read_queries, sample_queries
from retriever.data import sample_queries_path
from retriever.eedi import eedi_queries


def test_eedi_queries_come_from_the_shared_template(eedi_file: Path) -> None:
    queries = read_queries(eedi_file, "eedi")
    shared = eedi_queries(eedi_file)
    assert [(q.id, q.text) for q in queries] == [(s.id, s.text) for s in shared]
    # Only wrong answers with a misconception id: 10_A, 10_D, 11_B, 11_D, 12_A.
    assert [q.id for q in queries] == ["10_A", "10_D", "11_B", "11_D", "12_A"]
    assert queries[0].relevant == ("1",)
    assert "Correct answer: \\( \\frac{5}{6} \\)" in queries[0].text
    assert queries[2].text.endswith("Incorrect answer: 0.45")


def test_eedi_template_and_all_answers_are_options(eedi_file: Path) -> None:
    options = QueryFileOptions(template="{QuestionId}/{IncorrectAnswer}: {IncorrectAnswerText}",
                               all_answers=True)
    queries = read_queries(eedi_file, "eedi", options)
    assert len(queries) == 12  # three wrong answers for each of four questions
    assert queries[0].id == "10_A"
    assert queries[0].text == "10/A: \\( \\frac{2}{5} \\)"
    assert queries[-1].relevant == ()  # 13_C has no label


def test_eedi_bad_template_names_the_fields(eedi_file: Path) -> None:
    with pytest.raises(InputError, match=r"\{ConstructName\}"):
        read_queries(eedi_file, "eedi", QueryFileOptions(template="{Question}"))


def test_eedi_file_without_labels_queries_every_wrong_answer(tmp_path: Path,
                                                             eedi_file: Path) -> None:
    lines = eedi_file.read_text(encoding="utf-8").splitlines(keepends=True)
    unlabelled = tmp_path / "test.csv"
    unlabelled.write_text(lines[0] + lines[-1], encoding="utf-8")  # question 13 only
    assert [q.id for q in read_queries(unlabelled, "eedi")] == ["13_A", "13_B", "13_C"]


def test_jsonl_and_csv_with_named_columns(tmp_path: Path) -> None:
    assert [q.id for q in read_queries(sample_queries_path(), "jsonl")][:3] == ["q1", "q2", "q3"]
    assert sample_queries()[0].relevant == ("1",)
    path = tmp_path / "q.csv"
    path.write_text('key,text\nb,"two, with a comma"\na,one\n', encoding="utf-8")
    queries = read_queries(path, "csv", QueryFileOptions(id_field="key", query_field="text"))
    assert [(q.id, q.text) for q in queries] == [("b", "two, with a comma"), ("a", "one")]


@pytest.mark.parametrize(
    ("content", "fmt", "message"),
    [
        ('{"id": "a", "query": "x"}\n{"id": "a", "query": "y"}\n', "jsonl", "more than once"),
        ('{"id": "a", "text": "x"}\n', "jsonl", r"q\.jsonl:1: no field 'query'"),
        ('{"id": "a", "query": "x"}\nnot json\n', "jsonl", r"q\.jsonl:2: not valid JSON"),
        ("", "jsonl", "holds no queries"),
    ],
)
def test_bad_query_files_are_refused_clearly(tmp_path: Path, content: str, fmt: str,
                                             message: str) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        read_queries(path, fmt)


def test_missing_file_and_unknown_format(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_queries(tmp_path / "nope.jsonl", "jsonl")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"id": "a", "query": "x"}), encoding="utf-8")
    with pytest.raises(InputError, match="unknown query format"):
        read_queries(path, "parquet")
