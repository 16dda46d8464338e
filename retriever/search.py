"""One batched search over many collections: a single encode, then one FAISS call per collection."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from retriever.embedder import Embedder
from retriever.index import Collection
from retriever.vocabulary import Hit


@dataclass(frozen=True)
class SearchQuery:
    text: str
    collection: str
    k: int


class Retriever:
    def __init__(self, embedder: Embedder, collections: Mapping[str, Collection]) -> None:
        self.embedder = embedder
        self.collections = collections

    def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        """Top-k hits for each query, in input order. Unknown collections raise KeyError."""
        if not queries:
            return []
        vectors = self.embedder.encode([q.text for q in queries])
        by_collection: dict[str, list[int]] = defaultdict(list)
        for position, query in enumerate(queries):
            by_collection[query.collection].append(position)
        results: list[list[Hit]] = [[] for _ in queries]
        for name, positions in by_collection.items():
            collection = self.collections[name]
            deepest = max(queries[p].k for p in positions)
            for position, hits in zip(positions, collection.search(vectors[positions], deepest),
                                      strict=True):
                results[position] = hits[: queries[position].k]
        return results
