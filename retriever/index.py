"""Collections: a manifest on disk that lets a load verify the collection, and a vector store
behind it (FAISS files beside the manifest, or a Milvus collection; retriever/stores/)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retriever.catalog import CatalogEntry
from retriever.embedder import Embedder
from retriever.encoders import EmbedderVariant
from retriever.vocabulary import (
    MANIFEST,
    MILVUS_LITE_SUFFIX,
    Hit,
    IndexIntegrityError,
    IndexKind,
    IndexSpec,
    Manifest,
    StoreKind,
    StoreTarget,
    sha256_file,
)

if TYPE_CHECKING:
    from retriever.stores import VectorStore

log = logging.getLogger(__name__)

# Build and swap directories start with a dot so that loaders never mistake them for collections.
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"


def build_collection(
    entries: list[CatalogEntry],
    embedder: Embedder,
    index_dir: str | Path,
    collection: str,
    *,
    instruction: str | None = None,
    kind: IndexKind = IndexKind.FLAT,
    hnsw_m: int = 32,
    ivf_lists: int | None = None,
    show_progress: bool = True,
    spec: IndexSpec | None = None,
    backend: StoreKind = StoreKind.FAISS,
    target: StoreTarget | None = None,
    vectors: np.ndarray | None = None,
    cleaning: dict[str, Any] | None = None,
    aliases: dict[str, list[str]] | None = None,
) -> Path:
    """Embed ``entries`` into a new collection ``index_dir/collection`` and swap it in atomically.

    The store is written under a new name first (a staging directory; for Milvus, a new Milvus
    collection), the manifest last, and only then is it made the served one (a rename; for
    Milvus, an alias switch), so an interrupted build leaves the previous collection serving.
    ``vectors``, when given, are the entries' unit vectors from ``embedder``, already computed.
    ``cleaning`` (settings and counts) goes into the manifest; ``aliases`` (survivor id ->
    merged ids), when any, into ``aliases.json``, checksummed like the index files.
    """
    from retriever.stores import store_backend

    if not collection or collection.startswith(".") or "/" in collection:
        raise ValueError(f"invalid collection name {collection!r}")
    if collection.endswith(MILVUS_LITE_SUFFIX):
        raise ValueError(f"invalid collection name {collection!r}: a name ending in "
                         f"{MILVUS_LITE_SUFFIX} is a Milvus Lite database in an index directory")
    spec = spec or IndexSpec(kind=kind, hnsw_m=hnsw_m, ivf_lists=ivf_lists)
    root = Path(index_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / collection
    staging = root / f"{_STAGING_PREFIX}{collection}-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    builder = store_backend(backend).builder(staging, collection, embedder.dimension, spec,
                                             target or StoreTarget())
    try:
        if vectors is None:
            builder.add_entries(entries, embedder, show_progress)
        else:
            builder.add_vectors(entries, np.ascontiguousarray(vectors, dtype=np.float32))
        built = builder.finish()
        files = list(built.files)
        if aliases:
            from retriever.hygiene import ALIASES_FILE

            (staging / ALIASES_FILE).write_text(json.dumps(aliases, indent=1, sort_keys=True),
                                                encoding="utf-8")
            files.append(ALIASES_FILE)
        manifest = Manifest(
            collection=collection,
            embedder=embedder.name,
            embedder_sha256=embedder.weights_sha256,
            embedder_variant=str(embedder.variant),
            dimension=embedder.dimension,
            count=len(entries),
            index_kind=spec.kind.value,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            instruction=instruction,
            files={name: sha256_file(staging / name) for name in files},
            backend=backend.value,
            search_params=spec.search_params(),
            location=built.location,
            cleaning=cleaning or {},
        )
        (staging / MANIFEST).write_text(json.dumps(asdict(manifest), indent=2), encoding="utf-8")
        builder.publish()
        _swap_into_place(staging, final)
    except BaseException:
        builder.abort()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    builder.retire_previous()
    return final


def _swap_into_place(staging: Path, final: Path) -> None:
    retired = None
    if final.exists():
        retired = final.with_name(f"{_RETIRED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
        os.replace(final, retired)
    os.replace(staging, final)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


class Collection:
    """A loaded, verified collection: its manifest and the store that searches it."""

    def __init__(self, directory: Path, manifest: Manifest, store: VectorStore) -> None:
        self.directory = directory
        self.manifest = manifest
        self.store = store

    @property
    def name(self) -> str:
        return self.manifest.collection

    def __len__(self) -> int:
        return self.manifest.count

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        """Top-``k`` hits for each row of ``vectors`` (unit vectors), best first."""
        k = min(k, self.manifest.count)
        if k <= 0 or len(vectors) == 0:
            return [[] for _ in range(len(vectors))]
        rows = self.store.search(np.ascontiguousarray(vectors, dtype=np.float32), k)
        if not self.manifest.cleaning.get("duplicate_groups"):
            return rows
        return [[_with_aliases(hit) for hit in row] for row in rows]

    def health(self) -> str | None:
        """None while the store answers; else why not."""
        return self.store.health()

    @property
    def entries(self) -> list[CatalogEntry]:
        """Every entry, in build order (read from the store)."""
        return self.store.entries()

    def close(self) -> None:
        self.store.close()


def _with_aliases(hit: Hit) -> Hit:
    """The stores keep a merged entry's aliases in its metadata; a hit carries them apart."""
    from retriever.hygiene import ALIASES_KEY

    if ALIASES_KEY not in hit.metadata:
        return hit
    metadata = {k: v for k, v in hit.metadata.items() if k != ALIASES_KEY}
    return replace(hit, metadata=metadata, aliases=tuple(hit.metadata[ALIASES_KEY]))


def load_collection(directory: str | Path, embedder_name: str | None = None,
                    dimension: int | None = None, target: StoreTarget | None = None,
                    embedder_variant: EmbedderVariant | None = None,
                    embedder_sha256: Callable[[], str | None] | None = None) -> Collection:
    """Load and verify a collection; raise IndexIntegrityError naming the file and the fix, or
    CollectionUnavailableError when its store cannot be reached. ``embedder_sha256`` gives the
    configured embedder's weights digest, asked only when its name differs from the build's:
    the same weights moved elsewhere (a trained pipeline's directory mounted in a container)
    serve the collection."""
    from retriever.stores import store_backend

    directory = Path(directory)
    if not directory.is_dir():
        raise IndexIntegrityError(f"collection directory {directory} does not exist")
    manifest = Manifest.read(directory)
    rebuild = manifest.rebuild_hint(directory)
    for name, expected in manifest.files.items():
        path = directory / name
        if not path.is_file():
            raise IndexIntegrityError(f"{path} is missing; {rebuild}")
        if sha256_file(path) != expected:
            raise IndexIntegrityError(
                f"{path} does not match the sha256 recorded in {directory / MANIFEST}: the file was "
                f"modified or truncated after the build; {rebuild}"
            )
    same_weights = (embedder_name is not None and manifest.embedder != embedder_name
                    and manifest.embedder_sha256 is not None and embedder_sha256 is not None
                    and embedder_sha256() == manifest.embedder_sha256)
    if embedder_name is not None and manifest.embedder != embedder_name and not same_weights:
        raise IndexIntegrityError(
            f"{directory / MANIFEST} says collection {manifest.collection!r} was built with embedder "
            f"{manifest.embedder!r}, but the configured embedder is {embedder_name!r}; set "
            f"RANKD_EMBEDDER_MODEL={manifest.embedder} or {rebuild} with --model {embedder_name}"
        )
    if embedder_variant is not None and manifest.embedder_variant != str(embedder_variant):
        try:
            built = EmbedderVariant.parse(manifest.embedder_variant)
        except ValueError:
            raise IndexIntegrityError(
                f"{directory / MANIFEST} names embedder runtime {manifest.embedder_variant!r}, "
                f"which this rankd does not know; {rebuild}") from None
        raise IndexIntegrityError(
            f"{directory / MANIFEST} says collection {manifest.collection!r} was built with the "
            f"{str(built)!r} embedder runtime, but the configured one is {str(embedder_variant)!r}; "
            f"set RANKD_EMBEDDER_BACKEND={built.backend.value} "
            f"RANKD_EMBEDDER_QUANTIZATION={built.quantization.value}"
            f" or {rebuild} with --embedder-backend {embedder_variant.backend.value} "
            f"--embedder-quantization {embedder_variant.quantization.value}"
        )
    if dimension is not None and manifest.dimension != dimension:
        raise IndexIntegrityError(
            f"{directory / MANIFEST} records dimension {manifest.dimension}, the embedder gives "
            f"{dimension}; {rebuild}"
        )
    try:
        backend = store_backend(StoreKind(manifest.backend))
    except ValueError:
        raise IndexIntegrityError(
            f"{directory / MANIFEST} names backend {manifest.backend!r}, which this rankd does not "
            f"know ({', '.join(k.value for k in StoreKind)}); {rebuild}") from None
    store = backend.open(directory, manifest, target or StoreTarget())
    return Collection(directory, manifest, store)


def collection_dirs(index_dir: str | Path) -> list[Path]:
    """Collection directories under ``index_dir``, skipping staging and hidden ones and Milvus
    Lite databases, which may sit beside the manifests that name them."""
    root = Path(index_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and not p.name.endswith(MILVUS_LITE_SUFFIX))
