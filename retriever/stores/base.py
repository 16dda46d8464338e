"""What a vector store is: the Protocols every store implements and what a build returns. A
leaf the stores import, so that they need not import the registry that chooses them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from retriever.vocabulary import Hit, IndexSpec, Manifest, StoreTarget

if TYPE_CHECKING:
    from retriever.catalog import CatalogEntry
    from retriever.embedder import Embedder


class VectorStore(Protocol):
    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``vectors``, best first. Raises
        ``CollectionUnavailableError`` when the store cannot answer."""
        ...

    def health(self) -> str | None:
        """None while the store answers, else a one-line reason."""
        ...

    def entries(self) -> list[CatalogEntry]:
        """Every entry, in build order."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BuiltStore:
    files: list[str] = field(default_factory=list)  # written into the staging directory
    location: dict[str, Any] = field(default_factory=dict)  # recorded in the manifest


class StoreBuilder(Protocol):
    """One build: ``add_entries`` then ``finish``; after the manifest is written, ``publish``
    makes the new store the one served, and ``retire_previous`` drops what it replaced. On any
    failure ``abort`` removes what the build made and leaves the served collection alone."""

    def add_entries(self, entries: list[CatalogEntry], embedder: Embedder,
                    show_progress: bool) -> None: ...

    def add_vectors(self, entries: list[CatalogEntry], vectors: np.ndarray) -> None: ...

    def finish(self) -> BuiltStore: ...

    def publish(self) -> None: ...

    def abort(self) -> None: ...

    def retire_previous(self) -> None: ...


class StoreBackend(Protocol):
    def builder(self, staging: Path, collection: str, dimension: int, spec: IndexSpec,
                target: StoreTarget) -> StoreBuilder: ...

    def open(self, directory: Path, manifest: Manifest, target: StoreTarget) -> VectorStore: ...
