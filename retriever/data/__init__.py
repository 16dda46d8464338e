"""The embedded sample catalogue: maths misconceptions in the style of the Eedi catalogue."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

SAMPLE_COLLECTION = "misconceptions"
SAMPLE_ID_COLUMN = "MisconceptionId"
SAMPLE_TEXT_COLUMN = "MisconceptionName"
SAMPLE_INSTRUCTION = (
    "You are an experienced maths teacher. A student answered a multiple-choice question "
    "incorrectly. Choose the misconception that best explains the student's incorrect answer."
)


def sample_catalog_path() -> Path:
    return Path(str(resources.files(__package__).joinpath("sample_misconceptions.csv")))


def sample_queries_path() -> Path:
    """Labelled queries over the sample catalogue (JSONL: id, query, relevant)."""
    return Path(str(resources.files(__package__).joinpath("sample_queries.jsonl")))
