"""The int8 CPU path of the transformers reranker: dynamic int8 Linear layers, chosen by
RANKD_RERANKER_QUANTIZATION, agreeing with float32 on the real model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from reranker import RerankerConfig
from reranker.backends.transformers_backend import TransformersBackend
from reranker.errors import RerankerConfigError
from reranker.prompt import load_tokenizer
from retriever.catalog import CatalogEntry
from runtime.settings import SettingsError
from service.settings import load_settings
from tests.reranker.conftest import make_task, open_scorer


def test_int8_quantizes_the_decoder_and_keeps_the_output_layer(tiny_lm: Path) -> None:
    config = RerankerConfig(model=str(tiny_lm), quantization="int8", device="cpu")
    loaded = TransformersBackend.load(config, load_tokenizer(str(tiny_lm)))
    model, device = loaded.model, loaded.device
    quantized = [m for m in model.model.modules()
                 if isinstance(m, torch.ao.nn.quantized.dynamic.Linear)]
    assert quantized
    linear = [m for m in model.model.modules() if type(m) is torch.nn.Linear]
    assert linear == []  # every decoder Linear is int8
    assert type(model.get_output_embeddings()) is torch.nn.Linear
    assert device == "cpu"


def test_int8_is_refused_off_cpu_or_off_float32(tiny_lm: Path) -> None:
    config = RerankerConfig(model=str(tiny_lm), quantization="int8", device="cpu",
                            dtype="bfloat16")
    with pytest.raises(RerankerConfigError, match="RANKD_RERANKER_DTYPE=float32"):
        TransformersBackend.load(config, load_tokenizer(str(tiny_lm)))


def test_an_unknown_quantization_is_a_one_line_settings_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKD_RERANKER_QUANTIZATION", "int4")
    with pytest.raises(SettingsError, match=r"RANKD_RERANKER_QUANTIZATION.*none, int8"):
        load_settings()


@pytest.mark.slow
async def test_int8_smollm2_agrees_with_float32(smollm2: Path,
                                                catalogue: list[CatalogEntry]) -> None:
    tasks = [make_task(catalogue[i:i + 10], query) for i, query in enumerate([
        "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "What is 7 to the power 0? I said 0",
        "Work out -4 x -3. Incorrect answer: -12", "the median of 3, 9, 1. I said 9"])]
    scores = {}
    for quantization in ("none", "int8"):
        async with open_scorer("transformers", model=str(smollm2), dtype="float32",
                               quantization=quantization) as scorer:
            scores[quantization] = [s.probabilities for s in await scorer.score(tasks)]
    correlations = []
    for fp32, int8 in zip(scores["none"], scores["int8"], strict=True):
        assert sum(int8) == pytest.approx(1.0, abs=1e-4)
        correlations.append(float(np.corrcoef(fp32, int8)[0, 1]))
    print(f"\nint8 against float32, Pearson correlation per query: {correlations}")
    # A different model, close to the original: on 200 Eedi queries the two agree on the top
    # candidate for 54% and correlate at 0.72 (Spearman, docs/experiments.md). The activations'
    # int8 scale is set per batch, so the figures depend on what is batched together.
    assert scores["none"] != scores["int8"]
    assert sum(correlations) / len(correlations) > 0.7
