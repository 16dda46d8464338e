"""Catalogue hygiene at index build: noise filters, exact and near-duplicate merging, a report.

Two near-identical entries take two of the reranker's few candidate slots and split its label
probability between them. Merging keeps one entry of each group (by a stated rule) and records
the ids it absorbed as its aliases, so a query whose answer was a merged id is still answered.

- Noise: entries that are empty, only markup, or only digits and punctuation, and (when set)
  shorter than ``min_chars`` or longer than ``max_chars``. Each dropped entry is counted by rule.
- ``exact``: equal after Unicode NFKC normalisation, case folding and whitespace collapse.
- ``near``: cosine similarity at or above ``near_threshold`` between the entries' embeddings,
  found with one FAISS range search over the catalogue (BLAS, not a Python loop over pairs).
  Groups are formed greedily in keep order: each entry not yet absorbed becomes a survivor and
  absorbs the unabsorbed entries within the threshold of it, so every alias is within the
  threshold of its survivor (no chains of A~B~C merging A with a dissimilar C).
"""

from __future__ import annotations

import html
import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any

import numpy as np

from retriever.catalog import CatalogEntry

# Where an entry's absorbed ids live in its metadata; the service lifts them into `aliases`.
ALIASES_KEY = "rankd:aliases"
ALIASES_FILE = "aliases.json"
LARGEST_GROUPS = 20

_TAG = re.compile(r"<[^>]*>")
_MARKUP_SYMBOLS = re.compile(r"[\s\W_]+")  # what remains of markup once tags are gone
_DIGITS_ONLY = re.compile(r"[\d\s\W_]+")


class DedupMode(StrEnum):
    OFF = "off"
    EXACT = "exact"
    NEAR = "near"  # exact duplicates too: they are the most similar of all


class KeepRule(StrEnum):
    FIRST = "first"  # the entry that comes first in the catalogue
    LONGEST = "longest"  # the longest text; ties go to the first


@dataclass(frozen=True)
class CleaningSpec:
    dedup: DedupMode = DedupMode.OFF
    near_threshold: float = 0.95
    keep: KeepRule = KeepRule.FIRST
    filter_noise: bool = False  # empty, markup-only and digits-only entries
    min_chars: int = 0  # 0: no minimum
    max_chars: int = 0  # 0: no maximum

    def __post_init__(self) -> None:
        if not 0 < self.near_threshold <= 1:
            raise ValueError(f"--near-threshold must be in (0, 1], got {self.near_threshold}")
        if self.min_chars < 0 or self.max_chars < 0:
            raise ValueError("--min-chars and --max-chars must not be negative")
        if self.max_chars and self.min_chars > self.max_chars:
            raise ValueError(f"--min-chars ({self.min_chars}) exceeds --max-chars "
                             f"({self.max_chars})")

    @property
    def active(self) -> bool:
        return (self.dedup is not DedupMode.OFF or self.filter_noise or self.min_chars > 0
                or self.max_chars > 0)

    def settings(self) -> dict[str, Any]:
        return {"dedup": self.dedup.value, "near_threshold": self.near_threshold,
                "keep": self.keep.value, "filter_noise": self.filter_noise,
                "min_chars": self.min_chars, "max_chars": self.max_chars}


@dataclass
class CleaningReport:
    spec: CleaningSpec
    entries_in: int = 0
    entries_out: int = 0
    dropped: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    merged_exact: int = 0
    merged_near: int = 0
    groups: list[dict[str, Any]] = field(default_factory=list)  # largest first
    seconds: float = 0.0

    def counts(self) -> dict[str, Any]:
        return {"entries_in": self.entries_in, "entries_out": self.entries_out,
                "dropped": {rule: len(ids) for rule, ids in sorted(self.dropped.items())},
                "merged_exact": self.merged_exact, "merged_near": self.merged_near,
                "duplicate_groups": len(self.groups)}

    def as_dict(self) -> dict[str, Any]:
        return {"settings": self.spec.settings(), **self.counts(),
                "dropped_ids": {rule: ids for rule, ids in sorted(self.dropped.items())},
                "largest_groups": self.groups[:LARGEST_GROUPS],
                "seconds": round(self.seconds, 3)}

    def summary(self) -> str:
        dropped = ", ".join(f"{len(ids)} {rule}" for rule, ids in sorted(self.dropped.items()))
        return (f"cleaning: {self.entries_in} entries in, {self.entries_out} kept; dropped "
                f"{dropped or 'none'}; merged {self.merged_exact} exact and {self.merged_near} "
                f"near duplicates into {len(self.groups)} groups ({self.spec.dedup.value}"
                + (f", threshold {self.spec.near_threshold}" if self.spec.dedup is DedupMode.NEAR
                   else "") + f", keep {self.spec.keep.value})")


@dataclass(frozen=True)
class CleanedCatalog:
    entries: list[CatalogEntry]  # survivors, in catalogue order, aliases in their metadata
    vectors: np.ndarray | None  # the survivors' vectors, when near dedup embedded them
    aliases: dict[str, list[str]]  # survivor id -> absorbed ids
    report: CleaningReport


def normal_form(text: str) -> str:
    """The key of exact dedup: NFKC, case-folded, whitespace collapsed."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def noise_rule(text: str, spec: CleaningSpec) -> str | None:
    """The noise rule ``text`` breaks, or None."""
    stripped = text.strip()
    if spec.filter_noise:
        if not stripped:
            return "empty"
        if _TAG.search(stripped) and not _MARKUP_SYMBOLS.sub("", _TAG.sub("", html.unescape(
                stripped))):
            return "markup_only"
        if _DIGITS_ONLY.fullmatch(stripped):
            return "digits_only"
    if spec.min_chars and len(stripped) < spec.min_chars:
        return "too_short"
    if spec.max_chars and len(stripped) > spec.max_chars:
        return "too_long"
    return None


def _keep_order(entries: Sequence[CatalogEntry], rule: KeepRule) -> list[int]:
    if rule is KeepRule.LONGEST:
        return sorted(range(len(entries)), key=lambda i: (-len(entries[i].text), i))
    return list(range(len(entries)))


def exact_groups(entries: Sequence[CatalogEntry], rule: KeepRule) -> dict[int, list[int]]:
    """Survivor index -> absorbed indices, for entries equal in normal form."""
    by_key: dict[str, list[int]] = defaultdict(list)
    for i in _keep_order(entries, rule):
        by_key[normal_form(entries[i].text)].append(i)
    return {members[0]: members[1:] for members in by_key.values() if len(members) > 1}


def near_groups(vectors: np.ndarray, threshold: float, order: Sequence[int]
                ) -> tuple[dict[int, list[int]], dict[tuple[int, int], float]]:
    """Survivor index -> absorbed indices, for unit vectors within ``threshold`` cosine of
    their survivor; and the similarity of each (survivor, absorbed) pair."""
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    # Rounding can put an exact copy a hair under 1.0; the threshold allows for it.
    lims, similarities, neighbours = index.range_search(vectors, threshold - 1e-6)
    absorbed_by: dict[int, int] = {}
    groups: dict[int, list[int]] = {}
    similarity: dict[tuple[int, int], float] = {}
    for i in order:
        if i in absorbed_by:
            continue
        start, end = int(lims[i]), int(lims[i + 1])
        members = []
        for j, score in zip(neighbours[start:end].tolist(), similarities[start:end].tolist(),
                            strict=True):
            if j != i and j not in absorbed_by and j not in groups:
                absorbed_by[j] = i
                members.append(j)
                similarity[(i, j)] = score
        if members:
            groups[i] = sorted(members)
    return groups, similarity


def clean_catalog(entries: Sequence[CatalogEntry], spec: CleaningSpec,
                  embed: Any = None) -> CleanedCatalog:
    """Filter and merge ``entries``. ``embed(texts) -> unit vectors`` is needed for ``near``;
    the survivors' vectors are returned so that the build does not embed them again."""
    import time

    started = time.perf_counter()
    report = CleaningReport(spec, entries_in=len(entries))
    kept: list[CatalogEntry] = []
    for entry in entries:
        rule = noise_rule(entry.text, spec)
        if rule is None:
            kept.append(entry)
        else:
            report.dropped[rule].append(entry.id)
    absorbed: dict[int, list[int]] = {}
    vectors: np.ndarray | None = None
    if spec.dedup is not DedupMode.OFF:
        absorbed = exact_groups(kept, spec.keep)
        report.merged_exact = sum(len(m) for m in absorbed.values())
    similarity: dict[tuple[int, int], float] = {}
    if spec.dedup is DedupMode.NEAR:
        if embed is None:
            raise ValueError("near dedup needs the embedder")
        gone = {j for members in absorbed.values() for j in members}
        remaining = [i for i in range(len(kept)) if i not in gone]
        all_vectors = np.ascontiguousarray(embed([kept[i].text for i in remaining]),
                                           dtype=np.float32)
        position = {i: p for p, i in enumerate(remaining)}
        order = [position[i] for i in _keep_order(kept, spec.keep) if i in position]
        near, scores = near_groups(all_vectors, spec.near_threshold, order)
        for survivor, members in near.items():
            s = remaining[survivor]
            merged = [remaining[m] for m in members]
            report.merged_near += len(merged)
            # A survivor's own exact copies come along with it.
            absorbed[s] = sorted(absorbed.get(s, []) + merged
                                 + [c for m in merged for c in absorbed.pop(m, [])])
            for m in members:
                similarity[(s, remaining[m])] = scores[(survivor, m)]
        gone = {j for members in absorbed.values() for j in members}
        vectors = all_vectors[[position[i] for i in range(len(kept)) if i not in gone]]
    gone = {j for members in absorbed.values() for j in members}
    aliases = {kept[s].id: [kept[j].id for j in members] for s, members in absorbed.items()}
    survivors = []
    for i, entry in enumerate(kept):
        if i in gone:
            continue
        if entry.id in aliases:
            entry = replace(entry, metadata={**entry.metadata, ALIASES_KEY: aliases[entry.id]})
        survivors.append(entry)
    report.entries_out = len(survivors)
    report.groups = sorted(
        ({"kept": {"id": kept[s].id, "text": kept[s].text},
          "merged": [{"id": kept[j].id, "text": kept[j].text,
                      "similarity": round(similarity.get((s, j), 1.0), 4)} for j in members]}
         for s, members in absorbed.items()),
        key=lambda g: (-len(g["merged"]), g["kept"]["id"]))
    report.seconds = time.perf_counter() - started
    return CleanedCatalog(survivors, vectors, aliases, report)
