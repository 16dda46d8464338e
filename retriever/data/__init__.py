"""The embedded sample catalogue: maths misconceptions in the style of the Eedi catalogue."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from retriever.embedder import Embedder
    from retriever.encoders import EmbedderVariant

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


def build_sample_collection(embedder: Embedder, index_dir: str | Path) -> Path:
    """Index the sample catalogue as ``index_dir/SAMPLE_COLLECTION``, with its instruction."""
    from retriever.catalog import read_catalog
    from retriever.index import build_collection

    entries = read_catalog(sample_catalog_path(), SAMPLE_ID_COLUMN, SAMPLE_TEXT_COLUMN)
    return build_collection(entries, embedder, index_dir, SAMPLE_COLLECTION,
                            instruction=SAMPLE_INSTRUCTION, show_progress=False)


def ensure_sample_collection(index_dir: str | Path, model: str,
                             variant: EmbedderVariant | None = None,
                             cache_dir: Path | None = None) -> Path:
    """Build the sample collection into ``index_dir`` unless it is there already."""
    directory = Path(index_dir) / SAMPLE_COLLECTION
    if (directory / "manifest.json").is_file():
        return directory
    from retriever.embedder import Embedder
    from retriever.encoders import EmbedderVariant

    print(f"building the sample collection {SAMPLE_COLLECTION!r} in {index_dir} ...", flush=True)
    return build_sample_collection(
        Embedder.load(model, variant=variant or EmbedderVariant(), cache_dir=cache_dir), index_dir)
