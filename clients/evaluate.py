"""``rankd eval``: score a submission against labels.

Metrics (AP@k, recall@k, nDCG@10) are retriever/evaluation.py's, as every trainer and bench
scores them.

Ranks are positions in the submitted row: a CSV has no scores, and for a JSONL answer the
service's order (ties kept in retrieval order) is the ranking; scores are never re-sorted.
Labelled queries missing from the submission score 0 and are counted; submission rows without a
label are ignored and counted. recall@k is reported only for k up to the longest submitted row.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients.queries import InputError, jsonl_objects
from retriever.evaluation import NDCG_K, Ranking, average_precision, ndcg, recall

DEFAULT_KS = (1, 5, 10, 25, 50, 100)
COMPETITION_K = 25
SOLUTION_ID = "QuestionId_Answer"


# ---------------------------------------------------------------- a whole submission


@dataclass
class Report:
    format: str
    map_k: int
    labelled: int  # queries with labels
    scored: int  # labelled queries present in the submission
    missing: int  # labelled queries absent from the submission (each scores 0)
    unlabelled: int  # submission rows with no label (ignored)
    depth: int  # the longest submitted row
    map: float
    recall: dict[int, float | None]  # None: the submission's rows are too short for this k
    ndcg10: float | None = None
    missing_ids: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["recall"] = {str(k): v for k, v in self.recall.items()}
        data["missing_ids"] = self.missing_ids[:100]
        return data


def canonical_labels(labels: Mapping[str, Sequence[str]],
                     aliases: Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    """``labels`` with each id merged at build (``rankd index build --dedup``) replaced by the
    id that absorbed it, so that a hit on the survivor counts as a hit on the merged id."""
    survivor = {merged: kept for kept, ids in aliases.items() for merged in ids}
    return {qid: list(dict.fromkeys(survivor.get(r, r) for r in rel))
            for qid, rel in labels.items()}


def evaluate(submission: Mapping[str, Ranking], labels: Mapping[str, Sequence[str]], *,
             fmt: str = "eedi", map_k: int = COMPETITION_K, ks: Sequence[int] = DEFAULT_KS,
             with_ndcg: bool = False,
             aliases: Mapping[str, Sequence[str]] | None = None) -> Report:
    """Mean metrics over every labelled query; missing ones contribute 0. ``aliases`` (kept id
    -> merged ids) credits a hit on a kept entry to the ids merged into it."""
    if aliases:
        labels = canonical_labels(labels, aliases)
    labelled = {qid: rel for qid, rel in labels.items() if rel}
    if not labelled:
        raise InputError("the labels hold no labelled query")
    depth = max((len(submission[qid]) for qid in labelled if qid in submission), default=0)
    missing = [qid for qid in labelled if qid not in submission]
    n = len(labelled)
    rows = [(submission.get(qid, ()), rel) for qid, rel in labelled.items()]
    return Report(
        format=fmt,
        map_k=map_k,
        labelled=n,
        scored=n - len(missing),
        missing=len(missing),
        unlabelled=sum(1 for qid in submission if qid not in labelled),
        depth=depth,
        map=sum(average_precision(r, rel, map_k) for r, rel in rows) / n,
        recall={k: (sum(recall(r, rel, k) for r, rel in rows) / n if k <= depth else None)
                for k in ks},
        ndcg10=sum(ndcg(r, rel) for r, rel in rows) / n if with_ndcg else None,
        missing_ids=missing,
    )


# ---------------------------------------------------------------- reading files


def _ranked_of(record: dict[str, Any]) -> list[str] | None:
    """Ranked ids of one JSONL line: ``ranked: [ids]``, ``results: [{id}]`` or a batch record
    (``response: {results}``). None for a batch record of a failed query."""
    if "ranked" in record:
        return [str(i) for i in record["ranked"]]
    results = record.get("results")
    if results is None and isinstance(record.get("response"), dict):
        if "ranking" in record["response"]:  # an /answer response: option labels, best first
            return [str(label) for label in record["response"]["ranking"]]
        results = record["response"].get("results")
    if results is None:
        return None
    return [str(r["id"]) for r in results]


def read_submission(path: str | Path) -> dict[str, list[str]]:
    """A submission: the Eedi CSV (``QuestionId_Answer,MisconceptionId`` with ids separated by
    spaces) or JSONL (``{id, ranked}`` or the batch client's output)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"submission {path} does not exist")
    rows: dict[str, list[str]] = {}
    if path.suffix.lower() == ".csv":
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or len(header) < 2:
                raise InputError(f"{path}: expected the header QuestionId_Answer,MisconceptionId")
            for row in reader:
                if not row:
                    continue
                if row[0] in rows:
                    raise InputError(f"{path}:{reader.line_num}: {row[0]!r} appears twice")
                rows[row[0]] = row[1].split() if len(row) > 1 else []
        return rows
    for line_no, record in jsonl_objects(path):
        if "id" not in record:
            raise InputError(f"{path}:{line_no}: no 'id'")
        try:
            ranked = _ranked_of(record)
        except (KeyError, TypeError):
            raise InputError(f"{path}:{line_no}: results without ids") from None
        if ranked is None:
            continue  # a failed query: no answer, so it counts as missing
        rows[str(record["id"])] = ranked
    return rows


def _eedi_labels(path: Path) -> dict[str, list[str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), [])
    if "CorrectAnswer" in header:  # the competition layout, e.g. train.csv
        from retriever.eedi import eedi_queries

        try:
            queries = eedi_queries(path, labelled_only=True)
        except (KeyError, ValueError) as exc:
            raise InputError(f"{path}: not the Eedi layout ({exc!r})") from None
        return {q.id: [q.misconception_id] for q in queries if q.misconception_id is not None}
    if header[:1] == [SOLUTION_ID]:  # a solution file: QuestionId_Answer,MisconceptionId
        return read_submission(path)
    raise InputError(f"{path}: expected the Eedi layout (train.csv) or a "
                     f"{SOLUTION_ID},MisconceptionId file")


def _generic_labels(path: Path) -> dict[str, list[str]]:
    labels: dict[str, list[str]] = {}
    for line_no, record in jsonl_objects(path):
        if "id" not in record or "relevant" not in record:
            raise InputError(f"{path}:{line_no}: a label line needs 'id' and 'relevant'")
        relevant = record["relevant"]
        labels[str(record["id"])] = ([str(r) for r in relevant] if isinstance(relevant, list)
                                     else [str(relevant)])
    return labels


def _mcq_labels(path: Path) -> dict[str, list[str]]:
    """The ``answer`` column of an LLM Science Exam CSV (``id,prompt,A..E,answer``)."""
    labels: dict[str, list[str]] = {}
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        for row in reader:
            if "id" not in row or "answer" not in row:
                raise InputError(f"{path}:{reader.line_num}: an mcq label file needs 'id' and "
                                 "'answer' columns")
            answer = (row["answer"] or "").strip().upper()
            if answer:
                labels[str(row["id"])] = [answer]
    return labels


LABEL_READERS = {"eedi": _eedi_labels, "jsonl": _generic_labels, "mcq": _mcq_labels}
MCQ_MAP_K = 3


def read_labels(path: str | Path, fmt: str) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels {path} does not exist")
    return LABEL_READERS[fmt](path)


def read_aliases(path: str | Path) -> dict[str, list[str]]:
    """Kept id -> merged ids: a collection's ``aliases.json``, or those that the results of a
    JSONL run (the batch client's output) carry."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"aliases {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc.msg})") from None
        if not isinstance(raw, dict):
            raise InputError(f"{path}: expected an object of kept id -> merged ids")
        return {str(k): [str(i) for i in v] for k, v in raw.items()}
    found: dict[str, list[str]] = {}
    for _, record in jsonl_objects(path):
        response = record.get("response")
        results = record.get("results") or (response.get("results")
                                             if isinstance(response, dict) else None) or []
        for result in results:
            if isinstance(result, dict) and result.get("aliases"):
                found[str(result["id"])] = [str(i) for i in result["aliases"]]
    return found


def evaluate_files(submission: str | Path, labels: str | Path, fmt: str,
                   map_k: int = COMPETITION_K, ks: Sequence[int] = DEFAULT_KS,
                   aliases: str | Path | None = None) -> Report:
    if fmt == "mcq":  # the LLM Science Exam metric: MAP@3; accuracy is recall@1
        map_k, ks = MCQ_MAP_K, (1, MCQ_MAP_K)
    merged = read_aliases(aliases) if aliases is not None else None
    if merged is None and Path(submission).suffix.lower() != ".csv":
        merged = read_aliases(submission)  # a JSONL run's results carry their aliases
    return evaluate(read_submission(submission), read_labels(labels, fmt), fmt=fmt,
                    map_k=map_k, ks=ks, with_ndcg=fmt == "jsonl", aliases=merged)


def format_report(report: Report) -> str:
    lines = [f"MAP@{report.map_k}: {report.map:.4f}"]
    if report.format == "mcq" and report.recall.get(1) is not None:
        lines.append(f"accuracy: {report.recall[1]:.4f}")
    for k, value in report.recall.items():
        shown = f"{value:.4f}" if value is not None else (
            f"n/a (the submission lists at most {report.depth} ids)")
        lines.append(f"recall@{k}: {shown}")
    if report.ndcg10 is not None:
        lines.append(f"nDCG@{NDCG_K}: {report.ndcg10:.4f}")
    lines.append(f"queries scored: {report.scored} of {report.labelled} labelled; "
                 f"missing from the submission: {report.missing} (scored 0)"
                 + (f"; rows without a label ignored: {report.unlabelled}"
                    if report.unlabelled else ""))
    if report.missing_ids:
        shown_ids = ", ".join(report.missing_ids[:10])
        more = "" if report.missing <= 10 else f" and {report.missing - 10} more"
        lines.append(f"missing: {shown_ids}{more}")
    return "\n".join(lines)


def write_report(report: Report, path: str | Path) -> None:
    Path(path).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
