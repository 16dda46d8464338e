from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.embedder import DEFAULT_EMBEDDER, Embedder, EmbedderLoadError, resolve_model


def test_default_resolves_to_the_offline_wheel() -> None:
    resolved = resolve_model("all-MiniLM-L6-v2")
    assert resolved.name == DEFAULT_EMBEDDER
    assert Path(resolved.location, "model.safetensors").is_file()


def test_embeddings_are_unit_length(embedder: Embedder) -> None:
    vectors = embedder.encode(["one half plus one third", "negative numbers"])
    assert vectors.shape == (2, 384)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_missing_local_directory_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EmbedderLoadError, match="RANKD_EMBEDDER_MODEL"):
        Embedder.load(str(tmp_path / "nope"))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbedderLoadError, match=r"(?s)HF_HUB_OFFLINE=1.*RANKD_EMBEDDER_MODEL"):
        Embedder.load("some-org/not-a-cached-model")
