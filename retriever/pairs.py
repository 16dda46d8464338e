"""Labelled pairs and their split: the data both trainers read (`rankd train-retriever`,
`rankd train-reranker`). Pairs come from Eedi's train.csv or JSONL; the split is by group (a
question), never by row; the validation set and its file let the served pipeline be scored on
exactly the questions training never saw; and a training run's output directory is prepared
the same way for both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from retriever.catalog import CatalogEntry, jsonl_objects
from retriever.eedi import DEFAULT_QUERY_TEMPLATE, eedi_queries

REPORT_FILE = "training_report.json"

class TrainingError(ValueError):
    """The training data or options cannot be used as given."""


# ---------------------------------------------------------------- labelled pairs


@dataclass(frozen=True)
class TrainingPair:
    """One labelled query. ``group`` keeps pairs of one question on one side of the split."""

    query_id: str
    group: str
    query: str
    positive_id: str


class PairFormat(StrEnum):
    EEDI = "eedi"
    JSONL = "jsonl"


def _eedi_pairs(path: Path, template: str) -> list[TrainingPair]:
    """Eedi ``train.csv``: one pair per incorrect answer with a misconception id."""
    try:
        queries = eedi_queries(path, template)
    except KeyError as exc:
        raise TrainingError(f"{path}: not an Eedi train.csv: column {exc} is missing") from None
    except ValueError as exc:  # a bad template, or a misconception id that is not a number
        raise TrainingError(f"{path}: {exc}") from None
    return [TrainingPair(q.id, q.question_id, q.text, q.misconception_id)
            for q in queries if q.misconception_id is not None]


def _jsonl_pairs(path: Path, template: str) -> list[TrainingPair]:
    """JSONL: ``{"query": ..., "positive_id": ...}`` per line.

    Optional ``id`` names the query and optional ``group`` (for example a question id) keeps
    related queries on one side of the validation split; without it a query text is its own
    group, so the same query with several positives never straddles the split.
    """
    pairs = []
    for line_no, row in jsonl_objects(path, TrainingError):
        query = row.get("query")
        positive = row.get("positive_id")
        if not isinstance(query, str) or not query.strip():
            raise TrainingError(f"{path}:{line_no}: field 'query' must be a non-empty string")
        if positive is None or isinstance(positive, (dict, list, bool)) or not str(positive).strip():
            raise TrainingError(
                f"{path}:{line_no}: field 'positive_id' must be a catalogue id (string or number)"
            )
        pairs.append(TrainingPair(str(row.get("id", f"line{line_no}")), _jsonl_group(row),
                                  query.strip(), str(positive).strip()))
    return pairs


def _jsonl_group(row: dict[str, Any]) -> str:
    return str(row.get("group", str(row.get("query", "")).strip()))


PAIR_READERS: dict[PairFormat, Callable[[Path, str], list[TrainingPair]]] = {
    PairFormat.EEDI: _eedi_pairs,
    PairFormat.JSONL: _jsonl_pairs,
}


def read_pairs(path: str | Path, fmt: PairFormat | str,
               template: str = DEFAULT_QUERY_TEMPLATE) -> list[TrainingPair]:
    """Labelled pairs from ``path``; Eedi rows become query text through ``retriever.eedi``."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"training file {path} does not exist")
    pairs = PAIR_READERS[PairFormat(fmt)](path, template)
    if not pairs:
        raise TrainingError(f"{path}: no labelled pairs found")
    return pairs


def _eedi_validation_rows(source: Path, groups: set[str], target: Path) -> int:
    with source.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        rows = [row for row in reader if row["QuestionId"] in groups]
        fieldnames = list(reader.fieldnames or [])
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    return len(rows)


def _jsonl_validation_rows(source: Path, groups: set[str], target: Path) -> int:
    lines = [line for line in source.read_text(encoding="utf-8").splitlines()
             if line.strip() and _jsonl_group(json.loads(line)) in groups]
    target.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


SPLIT_WRITERS: dict[PairFormat, tuple[str, Callable[[Path, set[str], Path], int]]] = {
    PairFormat.EEDI: ("csv", _eedi_validation_rows),
    PairFormat.JSONL: ("jsonl", _jsonl_validation_rows),
}


def write_validation_file(source: str | Path, fmt: PairFormat | str, groups: set[str],
                          directory: str | Path, stem: str = "validation") -> Path:
    """The rows of ``source`` whose question is in ``groups``, in its format, as
    ``directory/{stem}.csv`` (or ``.jsonl``): ``validation`` or ``test``.

    With it the served pipeline (`rankd batch`, `rankd eval`) is scored on exactly the
    questions that training never saw.
    """
    suffix, write = SPLIT_WRITERS[PairFormat(fmt)]
    target = Path(directory) / f"{stem}.{suffix}"
    write(Path(source), groups, target)
    return target


def check_positives(pairs: Sequence[TrainingPair], entries: Sequence[CatalogEntry]) -> None:
    """Every positive id must be a catalogue id."""
    known = {e.id for e in entries}
    missing = sorted({p.positive_id for p in pairs} - known)
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise TrainingError(
            f"{len(missing)} positive id(s) are not in the catalogue ({shown}); check --catalog "
            "and --id-column"
        )


# ---------------------------------------------------------------- split


@dataclass(frozen=True)
class Split:
    train: list[TrainingPair]
    validation: list[TrainingPair]
    held_out_ids: frozenset[str] = frozenset()
    dropped_pairs: int = 0  # training pairs removed because their positive is held out
    # Questions no choice may see: not trained on, not chosen on (validation chooses the
    # checkpoint, the fusion and the arms); measured once, at the end.
    test: list[TrainingPair] = field(default_factory=list)

    @property
    def trained_ids(self) -> set[str]:
        return {p.positive_id for p in self.train}


def split_pairs(pairs: Sequence[TrainingPair], validation_fraction: float,
                holdout_fraction: float = 0.0, seed: int = 0,
                test_fraction: float = 0.0) -> Split:
    """Split by group (question), never by row; optionally withhold positive ids from training.

    The groups are shuffled with ``seed``: the first ``validation_fraction`` of them (at least
    one, leaving at least one) go to validation, the next ``test_fraction`` to the test split,
    the rest to training; so a test split never changes which questions validate.
    ``holdout_fraction`` of the distinct positive ids are drawn at random and every training
    pair with one of them is dropped, so validation queries about them are honestly unseen.
    """
    if not 0 < validation_fraction < 1:
        raise TrainingError(f"validation fraction must be between 0 and 1, got {validation_fraction}")
    if not 0 <= holdout_fraction < 1:
        raise TrainingError(f"holdout fraction must be in [0, 1), got {holdout_fraction}")
    if not 0 <= test_fraction < 1 or validation_fraction + test_fraction >= 1:
        raise TrainingError(f"test fraction must be in [0, 1) and leave questions to train on "
                            f"beside validation's {validation_fraction}, got {test_fraction}")
    groups = sorted({p.group for p in pairs})
    if len(groups) < 2:
        raise TrainingError("a validation split needs pairs from at least two questions (groups)")
    rng = random.Random(seed)
    rng.shuffle(groups)
    n_validation = min(len(groups) - 1, max(1, round(validation_fraction * len(groups))))
    room = len(groups) - n_validation - 1
    n_test = min(room, max(1, round(test_fraction * len(groups)))) if test_fraction else 0
    validation_groups = set(groups[:n_validation])
    test_groups = set(groups[n_validation:n_validation + n_test])
    if test_fraction and not test_groups:
        raise TrainingError("a test split needs pairs from at least three questions (groups)")
    ids = sorted({p.positive_id for p in pairs})
    held_out = frozenset(rng.sample(ids, round(holdout_fraction * len(ids))))
    train = [p for p in pairs if p.group not in validation_groups | test_groups]
    kept = [p for p in train if p.positive_id not in held_out]
    if not kept:
        raise TrainingError("no training pairs remain after the split and the holdout")
    validation = [p for p in pairs if p.group in validation_groups]
    test = [p for p in pairs if p.group in test_groups]
    return Split(kept, validation, held_out, len(train) - len(kept), test)


def fold_of(group: str, folds: int, seed: int) -> int:
    """The cross-fitting fold of a question (group): a seeded hash of its id, so that
    `train-retriever --fold` and `train-reranker --fold-retrievers` agree without sharing any
    state, whatever else changes in the data."""
    digest = hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % folds


def without_fold(split: Split, folds: int, fold: int, seed: int) -> Split:
    """``split`` with the training pairs of fold ``fold`` of ``folds`` left out (validation
    unchanged): a retriever trained on it meets that fold's questions as it meets new ones."""
    if folds < 2 or not 0 <= fold < folds:
        raise TrainingError(f"fold must be in [0, folds) with folds >= 2, got fold {fold} of "
                            f"{folds}")
    kept = [p for p in split.train if fold_of(p.group, folds, seed) != fold]
    if not kept:
        raise TrainingError(f"no training pairs remain outside fold {fold} of {folds}")
    return replace(split, train=kept)


def with_train_fraction(split: Split, fraction: float, seed: int) -> Split:
    """``split`` with only ``fraction`` of its training questions (whole, a seeded draw), for a
    learning curve over the training data; validation and test unchanged."""
    if not 0 < fraction <= 1:
        raise TrainingError(f"train fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return split
    groups = sorted({p.group for p in split.train})
    random.Random(f"{seed}:train-fraction").shuffle(groups)
    kept_groups = set(groups[:max(1, round(fraction * len(groups)))])
    return replace(split, train=[p for p in split.train if p.group in kept_groups])


def cross_fit_record(folds: int, fold: int, seed: int, validation_fraction: float,
                     holdout_fraction: float, held_out_pairs: int,
                     test_fraction: float) -> dict[str, Any]:
    """What a fold's retriever writes to its report: the split it left its fold out of, for
    `train-reranker --fold-retrievers` to check against its own."""
    return {"folds": folds, "fold": fold, "seed": seed,
            "validation_fraction": validation_fraction, "test_fraction": test_fraction,
            "holdout_fraction": holdout_fraction, "held_out_pairs": held_out_pairs}


# ---------------------------------------------------------------- validation set


@dataclass(frozen=True)
class ValidationSet:
    queries: dict[str, str]  # query key -> text
    relevant: dict[str, set[str]]  # query key -> relevant catalogue ids
    seen: set[str]  # keys of queries with a relevant id among the training positives
    groups: dict[str, str] = field(default_factory=dict)  # query key -> its question (group)


def validation_set(split: Split) -> ValidationSet:
    """Validation queries (pairs sharing a query text are one query with several relevant ids)."""
    keys: dict[str, str] = {}  # query text -> key
    relevant: dict[str, set[str]] = defaultdict(set)
    groups: dict[str, str] = {}
    for pair in split.validation:
        if pair.query not in keys:
            key = pair.query_id if pair.query_id not in relevant else f"{pair.query_id}#{len(keys)}"
            keys[pair.query] = key
            relevant[key] = set()
            groups[key] = pair.group
        relevant[keys[pair.query]].add(pair.positive_id)
    trained = split.trained_ids
    return ValidationSet(
        queries={key: text for text, key in keys.items()},
        relevant=dict(relevant),
        seen={key for key, ids in relevant.items() if ids & trained},
        groups=groups,
    )


def require_positive(options: dict[str, float], error: type[Exception]) -> None:
    """Raise ``error`` naming the first option that is not above zero."""
    for name, value in options.items():
        if not value > 0:
            raise error(f"{name} must be positive, got {value}")


def prepare_output(directory: Path, overwrite: bool) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise TrainingError(f"output directory {directory} is not empty; pass --overwrite "
                                "to replace an earlier training run")
        if not (directory / REPORT_FILE).is_file():
            raise TrainingError(f"{directory} is not empty and holds no {REPORT_FILE}: it is not "
                                "an earlier training run, so it is not deleted; choose another --output")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Marks the directory as a training run at once, so that --overwrite may replace it even
    # when this run stops half-way; the full report replaces it at the end.
    (directory / REPORT_FILE).write_text(json.dumps({"status": "started"}), encoding="utf-8")
