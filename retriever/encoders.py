"""The embedder's runtimes: torch (sentence-transformers itself), ONNX Runtime and OpenVINO.

A non-torch runtime runs a graph exported from the loaded sentence-transformers model: the
transformer, its pooling and its normalisation in one ONNX file, so the tokens go in and the
sentence vector comes out. The export and its int8 variants are written once under the cache,
in a directory keyed by a digest of the model's weights, and reused by every later start:

- ``onnx``: the export fused by ONNX Runtime's transformer optimizer (attention, skip layer
  norm, bias GELU), as optimum's O2 level does; ``onnx`` int8 quantizes its MatMuls dynamically
  with per-channel int8 weights (``onnxruntime.quantization.quantize_dynamic``).
- ``openvino``: the plain export, compiled by OpenVINO; ``openvino`` int8 is NNCF's static
  post-training quantization, calibrated on the bundled sample catalogue and queries, so it
  needs no data beyond the wheel.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from runtime.paths import cache_root

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

# Bumped when the export or the quantization recipe changes, so that old cache entries are not
# reused for a different graph.
EXPORT_RECIPE = 2
OPSET = 17
CALIBRATION_BATCH = 8


class EmbedderBackend(StrEnum):
    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO = "openvino"


class EmbedderQuantization(StrEnum):
    NONE = "none"
    INT8 = "int8"


class EncoderExportError(RuntimeError):
    """The model could not be exported to, or loaded in, the requested runtime."""


@dataclass(frozen=True)
class EmbedderVariant:
    """Which runtime computes the vectors; recorded in a collection's manifest, since int8
    vectors differ from float32 ones."""

    backend: EmbedderBackend = EmbedderBackend.TORCH
    quantization: EmbedderQuantization = EmbedderQuantization.NONE

    def __post_init__(self) -> None:
        if self.backend is EmbedderBackend.TORCH and self.quantization is not EmbedderQuantization.NONE:
            raise ValueError("the torch embedder runs float32 only; set RANKD_EMBEDDER_BACKEND="
                             "onnx or openvino for RANKD_EMBEDDER_QUANTIZATION=int8")

    def __str__(self) -> str:
        if self.quantization is EmbedderQuantization.NONE:
            return self.backend.value
        return f"{self.backend.value}-{self.quantization.value}"

    @classmethod
    def parse(cls, text: str) -> EmbedderVariant:
        """The inverse of ``str``: ``torch``, ``onnx``, ``onnx-int8``, ``openvino-int8``..."""
        backend, _, quantization = text.strip().partition("-")
        return cls(EmbedderBackend(backend), EmbedderQuantization(quantization or "none"))


TORCH_FLOAT32 = EmbedderVariant()

Features = Mapping[str, np.ndarray]


class Encoder(Protocol):
    """Token features of one batch in, one (batch, dimension) float32 array of vectors out."""

    def __call__(self, features: Features) -> np.ndarray: ...


def default_cache_dir() -> Path:
    return cache_root() / "embedders"


def weights_digest(model: SentenceTransformer) -> str:
    """sha256 over the model's parameters and buffers: the cache key of its exports, whatever
    path or hub id it was loaded from."""
    digest = hashlib.sha256(f"recipe {EXPORT_RECIPE} opset {OPSET}".encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def input_names(model: SentenceTransformer) -> list[str]:
    """The tensors the model's tokenizer produces (BERT-like models add token_type_ids)."""
    sample = model.preprocess(["rankd"])
    return [name for name, value in sample.items() if hasattr(value, "shape")]


def _atomic(target: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write`` on a temporary path beside ``target`` and move it into place, so that a
    concurrent start never reads a half-written file."""
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".export-") as tmp:
        partial = Path(tmp) / target.name
        write(partial)
        # OpenVINO writes an .xml and a .bin: the target, which says the export is there,
        # moves last, after the files it needs.
        for produced in sorted(Path(tmp).iterdir(), key=lambda f: f.name == target.name):
            os.replace(produced, target.parent / produced.name)
    return target


def export_onnx(model: SentenceTransformer, target: Path) -> Path:
    """The whole sentence-transformers pipeline as one ONNX graph with dynamic batch and
    sequence axes."""
    import torch

    names = input_names(model)

    class Pipeline(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
            return self.model(dict(zip(names, tensors, strict=True)))["sentence_embedding"]

    def write(path: Path) -> None:
        sample = model.preprocess(["rankd exports this", "and this"])
        axes = {name: {0: "batch", 1: "sequence"} for name in names}
        # Eager attention exports as plain MatMul/Softmax, which ONNX Runtime's optimizer fuses
        # into its Attention op; the SDPA export does not fuse.
        transformer: Any = model[0].auto_model
        previous = transformer.config._attn_implementation
        transformer.set_attn_implementation("eager")
        try:
            with warnings.catch_warnings():
                # The tracer warns about shape checks it freezes; those hold for any padded
                # batch, and the tests check the graph against torch at several lengths.
                warnings.simplefilter("ignore")
                # The TorchScript exporter: torch.export cannot yet trace sentence-transformers'
                # feature dict through the BERT mask helpers.
                torch.onnx.export(Pipeline().eval(), tuple(sample[n] for n in names), str(path),
                                  input_names=names, output_names=["sentence_embedding"],
                                  dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                                  opset_version=OPSET, dynamo=False)
        finally:
            transformer.set_attn_implementation(previous)

    return _atomic(target, write)


def _transformer_shape(model: SentenceTransformer) -> tuple[int, int]:
    transformer: Any = model[0].auto_model
    config = transformer.config
    return int(config.num_attention_heads), int(config.hidden_size)


def optimize_onnx(model: SentenceTransformer, source: Path, target: Path) -> Path:
    from onnxruntime.transformers import optimizer

    heads, hidden = _transformer_shape(model)

    def write(path: Path) -> None:
        optimized = optimizer.optimize_model(str(source), model_type="bert", num_heads=heads,
                                             hidden_size=hidden, opt_level=2)
        optimized.save_model_to_file(str(path))

    return _atomic(target, write)


def quantize_onnx(source: Path, target: Path) -> Path:
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    def write(path: Path) -> None:
        # Per-channel weights: per-tensor int8 MatMuls lose too much (mean cosine to float32
        # 0.965 against 0.993 on Eedi texts). 7-bit weights (reduce_range): CPUs without VNNI
        # (AVX2-only) add u8 x s8 products in saturating 16-bit pairs, which full 8-bit
        # weights can overflow; the cached file may be used on either kind of CPU.
        quantize_dynamic(str(source), str(path), op_types_to_quantize=["MatMul", "Attention"],
                         per_channel=True, reduce_range=True, weight_type=QuantType.QInt8,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    return _atomic(target, write)


def calibration_texts() -> list[str]:
    """The bundled sample catalogue's entries and queries: offline, and fixed, so the cached
    int8 model does not depend on the catalogue an index happened to be built from."""
    import json

    from retriever.data import (
        sample_entries,
        sample_queries_path,
    )

    entries = sample_entries()
    queries = sample_queries_path().read_text(encoding="utf-8").splitlines()
    return [e.text for e in entries] + [json.loads(line)["query"] for line in queries if line]


def quantize_openvino(model: SentenceTransformer, source: Path, target: Path) -> Path:
    import nncf
    import openvino as ov

    names = input_names(model)

    def write(path: Path) -> None:
        texts = calibration_texts()
        batches = [features(model, texts[i:i + CALIBRATION_BATCH], names)
                   for i in range(0, len(texts), CALIBRATION_BATCH)]
        quantized = nncf.quantize(ov.Core().read_model(str(source)), nncf.Dataset(batches),
                                  model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(batches))
        ov.save_model(quantized, str(path))

    return _atomic(target, write)


def features(model: SentenceTransformer, texts: list[str], names: list[str]) -> dict[str, np.ndarray]:
    """The tokenizer's tensors for ``texts``, as sentence-transformers itself would pad and
    truncate them."""
    prepared = model.preprocess(texts)
    return {name: prepared[name].numpy() for name in names}


class OnnxRuntimeEncoder:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(str(path), options,
                                             providers=["CPUExecutionProvider"])

    def __call__(self, features: Features) -> np.ndarray:
        (vectors,) = self._session.run(["sentence_embedding"], dict(features))
        return np.asarray(vectors, dtype=np.float32)


class OpenVinoEncoder:
    def __init__(self, path: Path, threads: int) -> None:
        import openvino as ov

        self._compiled = ov.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads})
        self._output = self._compiled.output(0)

    def __call__(self, features: Features) -> np.ndarray:
        # A fresh infer request per call: the micro-batcher's worker and a build may share one
        # compiled model, and a request object is not thread-safe.
        result = self._compiled.create_infer_request().infer(dict(features))
        return np.asarray(result[self._output], dtype=np.float32)


def _onnx_encoder(model: SentenceTransformer, directory: Path,
                  quantization: EmbedderQuantization, threads: int) -> Encoder:
    optimized = optimize_onnx(model, export_onnx(model, directory / "model.onnx"),
                              directory / "model_optimized.onnx")
    if quantization is EmbedderQuantization.INT8:
        return OnnxRuntimeEncoder(quantize_onnx(optimized, directory / "model_int8.onnx"),
                                  threads)
    return OnnxRuntimeEncoder(optimized, threads)


def _openvino_encoder(model: SentenceTransformer, directory: Path,
                      quantization: EmbedderQuantization, threads: int) -> Encoder:
    exported = export_onnx(model, directory / "model.onnx")
    if quantization is EmbedderQuantization.INT8:
        return OpenVinoEncoder(quantize_openvino(model, exported, directory / "openvino_int8.xml"),
                               threads)
    return OpenVinoEncoder(exported, threads)


EncoderFactory = Callable[["SentenceTransformer", Path, EmbedderQuantization, int], Encoder]

ENCODERS: dict[EmbedderBackend, EncoderFactory] = {
    EmbedderBackend.ONNX: _onnx_encoder,
    EmbedderBackend.OPENVINO: _openvino_encoder,
}

_EXTRA_HINT = {EmbedderBackend.ONNX: "onnx", EmbedderBackend.OPENVINO: "openvino"}


def load_encoder(model: SentenceTransformer, name: str, variant: EmbedderVariant,
                 cache_dir: Path | None, threads: int) -> Encoder:
    """The runtime for ``variant``, exporting into the cache on first use."""
    factory = ENCODERS[variant.backend]
    slug = name.rstrip("/").replace("/", "--").lstrip("-.")[-80:] or "model"
    directory = (cache_dir or default_cache_dir()) / f"{slug}-{weights_digest(model)[:16]}"
    try:
        encoder = factory(model, directory, variant.quantization, threads)
    except ImportError as exc:
        raise EncoderExportError(
            f"RANKD_EMBEDDER_BACKEND={variant.backend.value} needs {exc.name}: install "
            f"rankd[{_EXTRA_HINT[variant.backend]}]") from exc
    except Exception as exc:  # an exporter's failure names neither the model nor the fix
        raise EncoderExportError(
            f"cannot run embedder {name} as {variant} (cache {directory}): "
            f"{type(exc).__name__}: {str(exc).strip()[:500]}; set RANKD_EMBEDDER_BACKEND=torch"
        ) from exc
    log.info("embedder %s runs as %s from %s", name, variant, directory)
    return encoder
