"""The ``tiny_lm`` fixture (registered in tests/conftest.py): rankd/devtools/tiny_lm.py's model,
built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankd.devtools.tiny_lm import build_tiny_lm


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny causal LM's directory, built once per session. Treat as read-only."""
    return build_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))
