"""Query files for the batch client and the load test: eedi, jsonl, csv and mcq, behind one
registry.

Every reader returns :class:`Query` objects in file order. Eedi rows become query text through the
one template in :mod:`retriever.eedi`; nothing here builds Eedi text itself.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class InputError(ValueError):
    """A query or label file cannot be read as asked; the message names the file and line."""


@dataclass(frozen=True)
class Query:
    id: str
    text: str
    relevant: tuple[str, ...] = ()  # labelled ids, where the file has them
    options: tuple[str, ...] = ()  # mcq only: the answer options, labelled A, B, ... in order


@dataclass(frozen=True)
class QueryFileOptions:
    id_field: str = "id"
    query_field: str = "query"
    relevant_field: str = "relevant"
    template: str | None = None  # eedi only; None means retriever.eedi.DEFAULT_QUERY_TEMPLATE
    all_answers: bool = False  # eedi only: every incorrect answer, not only the labelled ones


def _relevant(value: Any) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, list):
        return tuple(str(v) for v in value)
    return tuple(str(value).split())


def _check_fields(path: Path, where: str, row: dict[str, Any], *names: str) -> None:
    missing = [n for n in names if n not in row]
    if missing:
        raise InputError(
            f"{path}:{where}: no field {', '.join(repr(m) for m in missing)} (fields: "
            f"{', '.join(repr(k) for k in row)}); name the columns with --id-field/--query-field"
        )


def jsonl_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file."""
    from retriever.catalog import jsonl_objects as read_objects

    return read_objects(path, InputError)


def _read_jsonl(path: Path, options: QueryFileOptions) -> list[Query]:
    queries = []
    for line_no, row in jsonl_objects(path):
        _check_fields(path, str(line_no), row, options.id_field, options.query_field)
        text = row[options.query_field]
        if not isinstance(text, str):
            raise InputError(f"{path}:{line_no}: {options.query_field!r} must be a string")
        queries.append(Query(str(row[options.id_field]), text,
                             _relevant(row.get(options.relevant_field))))
    return queries


def _read_csv(path: Path, options: QueryFileOptions) -> list[Query]:
    queries = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            _check_fields(path, str(reader.line_num), row, options.id_field, options.query_field)
            queries.append(Query(str(row[options.id_field]), row[options.query_field] or "",
                                 _relevant(row.get(options.relevant_field))))
    return queries


def _read_eedi(path: Path, options: QueryFileOptions) -> list[Query]:
    from retriever.eedi import DEFAULT_QUERY_TEMPLATE, eedi_queries

    template = options.template or DEFAULT_QUERY_TEMPLATE
    try:
        rows = eedi_queries(path, template, labelled_only=not options.all_answers)
        if not rows and not options.all_answers:
            # A test split carries no labels: every incorrect answer is then a query.
            rows = eedi_queries(path, template, labelled_only=False)
            if rows:
                log.info("%s has no misconception labels; querying every incorrect answer", path)
    except KeyError as exc:
        raise InputError(f"{path}: not the Eedi layout, column {exc} is missing") from None
    except ValueError as exc:  # a bad template, or a label that is not a number
        raise InputError(f"{path}: {exc}") from None
    return [Query(q.id, q.text, (q.misconception_id,) if q.misconception_id else ())
            for q in rows]


MCQ_OPTION_COLUMNS = ("A", "B", "C", "D", "E")


def _read_mcq(path: Path, options: QueryFileOptions) -> list[Query]:
    """The LLM Science Exam layout: ``id,prompt,A,B,C,D,E[,answer]``."""
    queries = []
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            where = str(reader.line_num)
            _check_fields(path, where, row, "id", "prompt", "A", "B")
            texts = [(row.get(c) or "").strip() for c in MCQ_OPTION_COLUMNS]
            while texts and not texts[-1]:
                texts.pop()
            if "" in texts:
                raise InputError(f"{path}:{where}: an empty option stands before a filled one")
            answer = (row.get("answer") or "").strip().upper()
            queries.append(Query(str(row["id"]), row["prompt"] or "",
                                 (answer,) if answer else (), tuple(texts)))
    return queries


Reader = Callable[[Path, QueryFileOptions], list[Query]]

READERS: dict[str, Reader] = {
    "eedi": _read_eedi,
    "jsonl": _read_jsonl,
    "csv": _read_csv,
    "mcq": _read_mcq,
}


def read_queries(path: str | Path, fmt: str,
                 options: QueryFileOptions | None = None) -> list[Query]:
    """Queries in file order. Ids must be unique: resumption and evaluation key on them."""
    path = Path(path)
    if fmt not in READERS:
        raise InputError(f"unknown query format {fmt!r}; use one of {', '.join(READERS)}")
    if not path.is_file():
        raise InputError(f"query file {path} does not exist")
    queries = READERS[fmt](path, options or QueryFileOptions())
    seen: set[str] = set()
    for query in queries:
        if query.id in seen:
            raise InputError(f"{path}: id {query.id!r} appears more than once; ids must be unique")
        seen.add(query.id)
    if not queries:
        raise InputError(f"{path} holds no queries")
    return queries


def sample_queries() -> list[Query]:
    """The labelled query set over the embedded sample catalogue."""
    from retriever.data import sample_queries_path

    return read_queries(sample_queries_path(), "jsonl")
