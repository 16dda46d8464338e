"""Where the embedded sample catalogue is: maths misconceptions in the style of the Eedi
catalogue, and labelled queries over it, and its entries read; what builds an index from it is
retriever/sample.py."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from retriever.catalog import CatalogEntry, read_catalog

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


def sample_entries() -> list[CatalogEntry]:
    """The sample catalogue's entries, with their metadata."""
    return read_catalog(sample_catalog_path(), SAMPLE_ID_COLUMN, SAMPLE_TEXT_COLUMN)
