"""dtype=auto: bfloat16 where the hardware computes it natively, float32 on other CPUs; the
choice and its reason reach the start-up log and /ready."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from reranker import RerankerConfig
from reranker.backends.transformers_backend import TransformersBackend
from reranker.precision import choose_dtype
from reranker.prompt import load_tokenizer
from runtime.settings import SettingsError
from service.settings import load_settings
from tests.support.apps import app_client

AVX2_HOST = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(("flags", "expected"), [
    (AVX2_HOST | {"amx_tile", "amx_bf16", "avx512f", "avx512_bf16"}, "bfloat16"),
    (AVX2_HOST | {"avx512f", "avx512_bf16"}, "bfloat16"),  # AMD Zen 4: no AMX
    (AVX2_HOST | {"avx512f"}, "float32"),  # AVX-512 without its bf16 instructions
    (AVX2_HOST, "float32"),
    (frozenset(), "float32"),  # flags unreadable (not Linux)
])
def test_auto_takes_bfloat16_only_where_the_cpu_computes_it(flags: frozenset[str],
                                                            expected: str) -> None:
    choice = choose_dtype("auto", "cpu", flags)
    assert choice.name == expected
    assert choice.reason.startswith("auto: ")
    if expected == "bfloat16":
        assert next(f for f in ("amx_bf16", "avx512_bf16") if f in flags) in choice.reason


def test_auto_on_a_gpu_and_explicit_settings() -> None:
    assert choose_dtype("auto", "cuda", cuda_bf16=True).name == "bfloat16"
    assert choose_dtype("auto", "cuda:1", cuda_bf16=False).name == "float16"
    explicit = choose_dtype("float32", "cpu", AVX2_HOST | {"amx_bf16"})
    assert (explicit.name, explicit.reason) == ("float32", "RANKD_RERANKER_DTYPE")
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        choose_dtype("fp8", "cpu")


def test_an_unknown_dtype_is_a_one_line_settings_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANKD_RERANKER_DTYPE", "half")
    with pytest.raises(SettingsError, match=r"RANKD_RERANKER_DTYPE: .*auto, float32"):
        load_settings()


def test_this_machine_loads_the_dtype_auto_chooses(tiny_lm: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    chosen = choose_dtype("auto", "cpu")
    # The host's flags as lscpu reads them, not through cpu_flags(): a parser that misread
    # /proc/cpuinfo (or read none) would choose float32 on a bf16 host, and fail here.
    listed = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    flags = next((line.split(":", 1)[1].split() for line in listed.splitlines()
                  if line.startswith("Flags:")), [])
    assert chosen.name == ("bfloat16" if {"amx_bf16", "avx512_bf16"} & set(flags)
                           else "float32"), (chosen, flags)
    config = RerankerConfig(model=str(tiny_lm), device="cpu")
    with caplog.at_level(logging.INFO, logger="reranker.backends.transformers_backend"):
        loaded = TransformersBackend.load(config, load_tokenizer(str(tiny_lm)))
    assert loaded.dtype == chosen
    assert next(loaded.model.parameters()).dtype == getattr(torch, chosen.name)
    assert f"in {chosen}" in caplog.text
    # int8 starts from float32 weights, whatever the CPU could do in bfloat16.
    int8 = TransformersBackend.load(config.model_copy(update={"quantization": "int8"}),
                                    load_tokenizer(str(tiny_lm)))
    assert int8.dtype.name == "float32"


async def test_ready_says_which_dtype_and_why(settings_factory: Any, tiny_lm: Path) -> None:
    settings = settings_factory(reranker_backend="transformers", reranker_model=str(tiny_lm),
                                reranker_dtype="auto")
    async with app_client(settings) as (_, client):
        detail = (await client.get("/ready")).json()["components"]["reranker"]["detail"]
        ranked = await client.post("/rank", json={"query": "1/2 + 1/3 = 2/5", "candidates": 5})
    assert detail.endswith(f"; cpu in {choose_dtype('auto', 'cpu')}")
    assert ranked.status_code == 200
    assert ranked.json()["reranked"] is True


def test_label_logits_are_float32_whatever_the_model_computes_in(tiny_lm: Path) -> None:
    """A bfloat16 output layer rounds logits to steps of 1/8 near 20, so yes/no scores tie;
    the backend recomputes the kept logits from the last hidden state in float32."""
    tokenizer = load_tokenizer(str(tiny_lm))
    config = RerankerConfig(model=str(tiny_lm), device="cpu", dtype="bfloat16")
    backend = TransformersBackend(TransformersBackend.load(config, tokenizer), config)
    model = backend.model
    prompts = [tokenizer.encode("a question and its candidates"), tokenizer.encode("another")]
    captured: list[torch.Tensor] = []
    inner = model.get_output_embeddings()
    handle = inner.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.inference_mode():
            from reranker.backends.transformers_backend import last_logits

            logits = last_logits(model, prompts, backend.pad_token_id, "cpu")
    finally:
        handle.remove()
    hidden = captured[-1][:, -1, :].float()
    expected = hidden @ inner.weight.float().T
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    # Not bfloat16 values: the rounding the float32 layer exists to avoid.
    assert not torch.equal(logits, logits.bfloat16().float())
