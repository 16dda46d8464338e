"""Catalogue readers: CSV, JSONL and Parquet files with an id column and a text column."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any


class CatalogError(ValueError):
    """The catalogue file cannot be read as asked."""


class CatalogFormat(StrEnum):
    CSV = "csv"
    JSONL = "jsonl"
    PARQUET = "parquet"

    @classmethod
    def from_path(cls, path: Path) -> CatalogFormat:
        suffix = path.suffix.lower().lstrip(".")
        aliases = {"csv": cls.CSV, "jsonl": cls.JSONL, "ndjson": cls.JSONL, "parquet": cls.PARQUET,
                   "pq": cls.PARQUET}
        if suffix not in aliases:
            raise CatalogError(
                f"cannot tell the format of {path} from its suffix; pass --format csv|jsonl|parquet"
            )
        return aliases[suffix]


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


def _csv_rows(path: Path) -> Iterator[dict[str, Any]]:
    with path.open(newline="", encoding="utf-8") as fh:
        yield from csv.DictReader(fh)


def jsonl_objects(path: Path, error: type[Exception] = ValueError
                  ) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a line that is not one
    JSON object raises ``error`` naming the file and the line."""
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{line_no}: expected a JSON object per line")
            yield line_no, row


def _jsonl_rows(path: Path) -> Iterator[dict[str, Any]]:
    for _, row in jsonl_objects(path, CatalogError):
        yield row


def _parquet_rows(path: Path) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    yield from pq.read_table(path).to_pylist()


_READERS = {
    CatalogFormat.CSV: _csv_rows,
    CatalogFormat.JSONL: _jsonl_rows,
    CatalogFormat.PARQUET: _parquet_rows,
}


def _id_string(value: Any) -> str:
    # Ids are strings on the wire; a float id from a spreadsheet ("12.0") means the integer.
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def read_catalog(
    path: str | Path,
    id_column: str,
    text_column: str,
    fmt: CatalogFormat | str | None = None,
    allow_empty: bool = False,
) -> list[CatalogEntry]:
    """Read a catalogue; columns other than id and text are kept as metadata. Empty texts are
    an error unless ``allow_empty`` (the build's noise filter then drops and counts them)."""
    path = Path(path)
    if not path.is_file():
        raise CatalogError(f"catalogue file {path} does not exist")
    catalog_format = CatalogFormat(fmt) if fmt else CatalogFormat.from_path(path)
    entries: list[CatalogEntry] = []
    seen: set[str] = set()
    for row_no, row in enumerate(_READERS[catalog_format](path), 1):
        for column in (id_column, text_column):
            if column not in row:
                raise CatalogError(
                    f"{path}: row {row_no} has no column {column!r}; columns are {sorted(row)}"
                )
        entry_id = _id_string(row[id_column])
        text = "" if row[text_column] is None else str(row[text_column]).strip()
        if not entry_id:
            raise CatalogError(f"{path}: row {row_no} has an empty id in column {id_column!r}")
        if not text and not allow_empty:
            raise CatalogError(f"{path}: row {row_no} (id {entry_id}) has empty text")
        if entry_id in seen:
            raise CatalogError(f"{path}: id {entry_id!r} appears more than once")
        seen.add(entry_id)
        metadata = {k: v for k, v in row.items() if k not in (id_column, text_column)}
        entries.append(CatalogEntry(entry_id, text, metadata))
    if not entries:
        raise CatalogError(f"{path}: the catalogue is empty")
    return entries
