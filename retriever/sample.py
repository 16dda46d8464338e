"""The embedded sample catalogue as entries and as a collection (`rankd serve --sample`, the
image's index step, the tests and the benchmarks)."""

from __future__ import annotations

from pathlib import Path

from retriever.data import SAMPLE_COLLECTION, SAMPLE_INSTRUCTION, sample_entries
from retriever.embedder import Embedder
from retriever.encoders import EmbedderVariant
from retriever.index import build_collection
from retriever.vocabulary import MANIFEST


def build_sample_collection(embedder: Embedder, index_dir: str | Path) -> Path:
    """Index the sample catalogue as ``index_dir/SAMPLE_COLLECTION``, with its instruction."""
    return build_collection(sample_entries(), embedder, index_dir, SAMPLE_COLLECTION,
                            instruction=SAMPLE_INSTRUCTION, show_progress=False)


def ensure_sample_collection(index_dir: str | Path, model: str,
                             variant: EmbedderVariant | None = None,
                             cache_dir: Path | None = None) -> Path:
    """Build the sample collection into ``index_dir`` unless it is there already."""
    directory = Path(index_dir) / SAMPLE_COLLECTION
    if (directory / MANIFEST).is_file():
        return directory
    print(f"building the sample collection {SAMPLE_COLLECTION!r} in {index_dir} ...", flush=True)
    return build_sample_collection(
        Embedder.load(model, variant=variant or EmbedderVariant(), cache_dir=cache_dir), index_dir)
