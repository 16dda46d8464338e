"""Milvus: a collection's vectors, ids, texts and metadata in a Milvus collection.

Milvus Lite (a local ``.db`` file, in process), Milvus Standalone and Milvus Distributed speak
the same client API, so one store serves a laptop and a cluster; only the URI differs. A build
writes a new Milvus collection under a fresh name and, once it is indexed and loaded, switches
the alias that the manifest names to it: searches follow the alias, so an interrupted build
never touches what is served, and every replica that reads the same Milvus sees the same
collection.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from retriever.catalog import CatalogEntry
from retriever.embedder import Embedder
from retriever.stores.base import BuiltStore
from retriever.vocabulary import (
    MILVUS_LITE_SUFFIX,
    CollectionUnavailableError,
    Hit,
    IndexIntegrityError,
    IndexKind,
    IndexSpec,
    Manifest,
    StoreTarget,
)

if TYPE_CHECKING:
    from pymilvus import MilvusClient

log = logging.getLogger(__name__)

# Entries embedded and inserted per step of a build.
BUILD_BATCH = 1024
# Milvus caps a VARCHAR at 65,535 bytes.
MAX_TEXT_BYTES = 65_535
MAX_ID_BYTES = 512
MAX_LISTS = 65_536  # Milvus's bound on an IVF index's nlist
# Seconds a call to the server may take before the store reports it unavailable.
CALL_TIMEOUT_S = 10.0
# /ready probes each Milvus collection; a readiness probe waits seconds, not tens of them.
HEALTH_TIMEOUT_S = 2.0
_INDEX_TYPES = {IndexKind.FLAT: "FLAT", IndexKind.HNSW: "HNSW", IndexKind.IVF: "IVF_FLAT"}
_OUTPUT_FIELDS = ["entry_id", "text", "metadata"]


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://", "tcp://", "grpc://", "unix:"))


def normalise_uri(uri: str) -> str:
    """A server URI as given; a Milvus Lite file as an absolute path, so that the manifest
    finds it again from any working directory."""
    if is_remote(uri):
        return uri
    path = Path(uri).expanduser()
    if path.suffix != MILVUS_LITE_SUFFIX:
        raise ValueError(f"Milvus Lite needs a file name ending in .db, got {uri!r}; or give a "
                         "server URI such as http://localhost:19530")
    return str(path.resolve())


def alias_for(collection: str) -> str:
    """The Milvus alias serving a rankd collection (Milvus names allow [A-Za-z0-9_])."""
    return "rankd_" + re.sub(r"[^0-9A-Za-z_]", "_", collection)


def release_lite(uri: str) -> None:
    """Milvus Lite serves a .db file from threads of this process (a Python gRPC server) until
    the process exits; stop them once rankd's client of that file is closed, so that they take
    neither a core nor the interpreter lock from what runs next."""
    if is_remote(uri):
        return
    try:
        from milvus_lite.server_manager import server_manager_instance
    except ImportError:
        return
    server_manager_instance.release_server(uri)


def _message(exc: Exception) -> str:
    return str(getattr(exc, "message", "") or exc).strip()


def connect(uri: str, token: str | None) -> MilvusClient:
    """A client for ``uri``; CollectionUnavailableError when the server does not answer."""
    from pymilvus import MilvusClient, MilvusException

    # pymilvus logs every failed call with its traceback; rankd reports them in one line.
    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)
    try:
        return MilvusClient(uri=uri, token=token or "", timeout=CALL_TIMEOUT_S)
    except MilvusException as exc:
        raise CollectionUnavailableError(
            f"Milvus at {uri} is unreachable ({_message(exc)}); start the server or set "
            "RANKD_MILVUS_URI to one that answers") from exc


class MilvusBuilder:
    def __init__(self, collection: str, dimension: int, spec: IndexSpec,
                 target: StoreTarget) -> None:
        if not target.uri:
            raise ValueError("a Milvus build needs a URI: --milvus-uri ./milvus.db (Milvus Lite) "
                             "or http://host:19530")
        self.uri = normalise_uri(target.uri)
        self.client = connect(self.uri, target.token)
        self.alias = alias_for(collection)
        self.name = f"{self.alias}__{uuid.uuid4().hex[:8]}"
        self.dimension = dimension
        self.spec = spec
        self.count = 0
        self.previous: str | None = None
        self._create()

    def _create(self) -> None:
        from pymilvus import DataType, MilvusClient

        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("row", DataType.INT64, is_primary=True)
        schema.add_field("entry_id", DataType.VARCHAR, max_length=MAX_ID_BYTES)
        schema.add_field("text", DataType.VARCHAR, max_length=MAX_TEXT_BYTES)
        schema.add_field("metadata", DataType.JSON)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=self.dimension)
        self.client.create_collection(self.name, schema=schema)

    def add_entries(self, entries: list[CatalogEntry], embedder: Embedder,
                    show_progress: bool) -> None:
        from tqdm.auto import tqdm

        with tqdm(total=len(entries), unit="entries", desc=f"milvus {self.alias}",
                  disable=not show_progress) as bar:
            for start in range(0, len(entries), BUILD_BATCH):
                batch = entries[start:start + BUILD_BATCH]
                self.add_vectors(batch, embedder.encode([e.text for e in batch]))
                bar.update(len(batch))

    def add_vectors(self, entries: list[CatalogEntry], vectors: np.ndarray) -> None:
        rows = []
        for offset, (entry, vector) in enumerate(zip(entries, vectors, strict=True)):
            for name, value, limit in (("id", entry.id, MAX_ID_BYTES),
                                       ("text", entry.text, MAX_TEXT_BYTES)):
                size = len(value.encode("utf-8"))
                if size > limit:
                    raise ValueError(f"entry {entry.id!r}: its {name} is {size} bytes, over "
                                     f"Milvus's VARCHAR limit of {limit}; shorten it")
            rows.append({"row": self.count + offset, "entry_id": entry.id, "text": entry.text,
                         "metadata": json.loads(json.dumps(entry.metadata, default=str)),
                         "vector": vector.tolist()})
        self.client.insert(self.name, rows)
        self.count += len(rows)

    def _index_params(self) -> dict[str, Any]:
        spec = self.spec
        if spec.kind is IndexKind.HNSW:
            return {"M": spec.hnsw_m, "efConstruction": spec.ef_construction}
        if spec.kind is IndexKind.IVF:
            return {"nlist": spec.lists(self.count, most=MAX_LISTS)}
        return {}

    def finish(self) -> BuiltStore:
        self.client.flush(self.name)
        index = self.client.prepare_index_params()
        index.add_index(field_name="vector", index_type=_INDEX_TYPES[self.spec.kind],
                        metric_type="IP", params=self._index_params())
        self.client.create_index(self.name, index)
        self.client.load_collection(self.name)
        stored = int(self.client.get_collection_stats(self.name)["row_count"])
        if stored != self.count:
            raise RuntimeError(f"Milvus collection {self.name} holds {stored} rows after the "
                               f"build, {self.count} were inserted")
        return BuiltStore(location={"uri": self.uri, "alias": self.alias,
                                    "collection": self.name,
                                    "index_params": self._index_params()})

    def publish(self) -> None:
        from pymilvus import MilvusException

        try:
            self.previous = self.client.describe_alias(self.alias)["collection_name"]
        except MilvusException:
            self.previous = None
        if self.previous is None:
            self.client.create_alias(self.name, self.alias)
        else:
            self.client.alter_alias(self.name, self.alias)

    def abort(self) -> None:
        from pymilvus import MilvusException

        try:
            current = self.client.describe_alias(self.alias)["collection_name"]
        except MilvusException:
            current = None
        try:
            if current == self.name:  # the switch happened: point the alias back first
                if self.previous:
                    self.client.alter_alias(self.previous, self.alias)
                else:
                    self.client.drop_alias(self.alias)
            self.client.drop_collection(self.name)
        except MilvusException as exc:
            log.error("could not remove the unfinished Milvus collection %s: %s", self.name,
                      _message(exc))
        finally:
            self.client.close()
            release_lite(self.uri)

    def retire_previous(self) -> None:
        # Only collections this builder's scheme made are dropped: never a user's own.
        if self.previous and self.previous.startswith(f"{self.alias}__"):
            self.client.drop_collection(self.previous)
        self.client.close()
        release_lite(self.uri)


class MilvusStore:
    def __init__(self, client: MilvusClient, uri: str, alias: str, search_params: dict[str, int]
                 ) -> None:
        self.client = client
        self.uri = uri
        self.alias = alias
        self.search_params = search_params

    def search(self, vectors: np.ndarray, k: int) -> list[list[Hit]]:
        from pymilvus import MilvusException

        try:
            rows = self.client.search(self.alias, data=vectors.tolist(), limit=k,
                                      output_fields=_OUTPUT_FIELDS,
                                      search_params={"metric_type": "IP",
                                                     "params": self.search_params},
                                      timeout=CALL_TIMEOUT_S)
        except MilvusException as exc:
            raise CollectionUnavailableError(
                f"Milvus search of {self.alias} at {self.uri} failed: {_message(exc)}") from exc
        return [[Hit(row["entity"]["entry_id"], row["entity"]["text"], float(row["distance"]),
                     row["entity"].get("metadata") or {}) for row in hits] for hits in rows]

    def health(self) -> str | None:
        from pymilvus import MilvusException

        try:
            self.client.get_collection_stats(self.alias, timeout=HEALTH_TIMEOUT_S)
        except MilvusException as exc:
            return f"Milvus collection {self.alias} at {self.uri}: {_message(exc)}"
        return None

    def entries(self) -> list[CatalogEntry]:
        from pymilvus import MilvusException

        rows: list[dict[str, Any]] = []
        try:
            iterator = self.client.query_iterator(self.alias, batch_size=1000, filter="row >= 0",
                                                  output_fields=["row", *_OUTPUT_FIELDS])
            while batch := iterator.next():
                rows += batch
            iterator.close()
        except MilvusException as exc:
            raise CollectionUnavailableError(
                f"Milvus read of {self.alias} at {self.uri} failed: {_message(exc)}") from exc
        rows.sort(key=lambda row: row["row"])
        return [CatalogEntry(row["entry_id"], row["text"], row.get("metadata") or {})
                for row in rows]

    def close(self) -> None:
        self.client.close()
        release_lite(self.uri)


class MilvusBackend:
    def builder(self, staging: Path, collection: str, dimension: int, spec: IndexSpec,
                target: StoreTarget) -> MilvusBuilder:
        return MilvusBuilder(collection, dimension, spec, target)

    def open(self, directory: Path, manifest: Manifest, target: StoreTarget) -> MilvusStore:
        from pymilvus import MilvusException

        location = manifest.location
        rebuild = manifest.rebuild_hint(directory)
        if not location.get("uri") or not location.get("alias"):
            raise IndexIntegrityError(f"{directory}/manifest.json records no Milvus uri and "
                                      f"alias; {rebuild} --backend milvus")
        uri = target.uri or location["uri"]
        alias = location["alias"]
        client = connect(uri, target.token)
        try:
            if not client.has_collection(alias):
                raise CollectionUnavailableError(
                    f"Milvus at {uri} has no collection {alias!r} (collection "
                    f"{manifest.collection!r}); {rebuild} --backend milvus --milvus-uri {uri}")
            described = client.describe_collection(alias)
            vector = next(f for f in described["fields"] if f["name"] == "vector")
            dim = int(vector["params"]["dim"])
            if dim != manifest.dimension:
                raise IndexIntegrityError(
                    f"Milvus collection {alias!r} at {uri} holds vectors of dimension {dim}, the "
                    f"manifest {directory}/manifest.json says {manifest.dimension}; {rebuild}")
            client.load_collection(alias)
            count = int(client.get_collection_stats(alias)["row_count"])
        except MilvusException as exc:
            client.close()
            release_lite(uri)
            raise CollectionUnavailableError(
                f"Milvus at {uri} failed to open collection {alias!r}: {_message(exc)}") from exc
        except BaseException:
            client.close()
            release_lite(uri)
            raise
        if count != manifest.count:
            client.close()
            release_lite(uri)
            raise IndexIntegrityError(
                f"Milvus collection {alias!r} at {uri} holds {count} entries, the manifest "
                f"{directory}/manifest.json says {manifest.count}: another build switched the "
                f"alias; {rebuild}")
        defaults = IndexSpec(kind=IndexKind(manifest.index_kind))
        params = manifest.search_params or defaults.search_params()
        return MilvusStore(client, uri, alias, dict(params))


__all__ = ["MilvusBackend", "MilvusBuilder", "MilvusStore", "alias_for", "connect",
           "normalise_uri"]
