from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retriever.catalog import CatalogError, read_catalog
from retriever.data import sample_catalog_path

ROWS = [
    {"key": 7, "body": "Adds numerators and denominators", "topic": "Fractions"},
    {"key": 8, "body": "Confuses radius and diameter", "topic": "Circles"},
]


def _write(path: Path, fmt: str) -> Path:
    if fmt == "csv":
        path.write_text("key,body,topic\n" + "".join(f'{r["key"]},"{r["body"]}",{r["topic"]}\n'
                                                     for r in ROWS))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pq.write_table(pa.Table.from_pylist(ROWS), path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_reads_each_format_with_metadata(tmp_path: Path, fmt: str) -> None:
    path = _write(tmp_path / f"catalog.{fmt}", fmt)
    entries = read_catalog(path, "key", "body")
    assert [e.id for e in entries] == ["7", "8"]
    assert entries[1].text == "Confuses radius and diameter"
    assert entries[0].metadata == {"topic": "Fractions"}


def test_format_flag_overrides_suffix(tmp_path: Path) -> None:
    path = _write(tmp_path / "catalog.txt", "jsonl")
    with pytest.raises(CatalogError, match="--format"):
        read_catalog(path, "key", "body")
    assert len(read_catalog(path, "key", "body", "jsonl")) == 2


def test_missing_column_names_the_column(tmp_path: Path) -> None:
    path = _write(tmp_path / "catalog.csv", "csv")
    with pytest.raises(CatalogError, match="'name'"):
        read_catalog(path, "key", "name")


def test_duplicate_ids_and_empty_text_are_refused(tmp_path: Path) -> None:
    dup = tmp_path / "dup.csv"
    dup.write_text("id,text\n1,a\n1,b\n")
    with pytest.raises(CatalogError, match="more than once"):
        read_catalog(dup, "id", "text")
    empty = tmp_path / "empty.csv"
    empty.write_text("id,text\n1,  \n")
    with pytest.raises(CatalogError, match="empty text"):
        read_catalog(empty, "id", "text")


def test_float_ids_read_as_integers(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": 12.0, "text": "x"}) + "\n")
    assert read_catalog(path, "id", "text")[0].id == "12"


def test_sample_catalogue_is_shipped() -> None:
    entries = read_catalog(sample_catalog_path(), "MisconceptionId", "MisconceptionName")
    assert 55 <= len(entries) <= 80
    assert all(e.metadata.get("Topic") for e in entries)
