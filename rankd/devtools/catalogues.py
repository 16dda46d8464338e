"""A catalogue and its query texts for the benchmarks: the Eedi data when a directory is given
(misconception_mapping.csv and train.csv), else the embedded sample and its queries."""

from __future__ import annotations

from pathlib import Path

from retriever.catalog import CatalogEntry, read_catalog


def catalogue_and_queries(data: Path | None) -> tuple[list[CatalogEntry], list[str]]:
    if data is not None:
        from retriever.eedi import eedi_queries

        entries = read_catalog(data / "misconception_mapping.csv", "MisconceptionId",
                               "MisconceptionName")
        return entries, [q.text for q in eedi_queries(data / "train.csv")]
    from clients.queries import sample_queries
    from retriever.data import (
        sample_entries,
    )

    entries = sample_entries()
    return entries, [q.text for q in sample_queries()]
