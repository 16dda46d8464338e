"""Label validation against real tokenizers: one token each where the model answers, distinct."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from rankd.devtools.tiny_lm import build_tokenizer
from reranker import LabelAlphabet, LabelTokenError, ListwiseScorer, RerankerConfig, label_token_ids
from reranker.prompt import PromptRenderer


def _tokenizer(tmp_path: Path, kind: Any) -> Any:
    build_tokenizer(tmp_path, kind=kind)
    return AutoTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("alphabet", list(LabelAlphabet))
def test_labels_are_the_tokens_the_model_reads_after_the_prompt(tmp_path: Path,
                                                                alphabet: LabelAlphabet) -> None:
    tokenizer = _tokenizer(tmp_path, "bytelevel")
    context = PromptRenderer(tokenizer).answer_context()
    labels = alphabet.labels()
    ids = label_token_ids(tokenizer, labels, context)

    prompt_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    for label, token in zip(labels, ids, strict=True):
        assert tokenizer(context + label, add_special_tokens=False)["input_ids"] == [*prompt_ids, token]
        assert tokenizer.convert_ids_to_tokens(token) == label
    assert len(set(ids)) == len(labels)


def test_label_ids_come_from_the_answer_position_not_the_bare_label(tmp_path: Path) -> None:
    """A tokenizer that prefixes a space encodes a bare "A" as the one token "ĠA", which is not the
    token the model writes after "<|im_start|>assistant\\n"."""
    tokenizer = _tokenizer(tmp_path, "prefix_space")
    bare = tokenizer.encode("A", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(bare) == ["ĠA"]  # the trap: one token, the wrong one

    context = PromptRenderer(tokenizer).answer_context()
    ids = label_token_ids(tokenizer, LabelAlphabet.UPPER.labels(), context)
    assert ids[0] != bare[0]
    assert tokenizer.convert_ids_to_tokens(ids[:3]) == ["A", "B", "C"]
    assert tokenizer(context + "A", add_special_tokens=False)["input_ids"][-1] == ids[0]


def test_a_label_that_splits_refuses_with_label_tokens_and_setting(tmp_path: Path) -> None:
    """After "[/INST]" a SentencePiece-style tokenizer writes "▁A": two tokens without merges."""
    tokenizer = _tokenizer(tmp_path, "split_labels")
    context = PromptRenderer(tokenizer).answer_context()
    assert context.endswith("[/INST]")
    with pytest.raises(LabelTokenError) as caught:
        label_token_ids(tokenizer, LabelAlphabet.UPPER.labels(), context)
    message = str(caught.value)
    assert "label 'A'" in message
    assert "2 tokens ['▁', 'A']" in message
    assert "RANKD_RERANKER_LABEL_ALPHABET" in message


def test_labels_that_share_a_token_refuse_to_start(tmp_path: Path) -> None:
    tokenizer = _tokenizer(tmp_path, "uncased")
    context = PromptRenderer(tokenizer).answer_context()
    upper = label_token_ids(tokenizer, LabelAlphabet.UPPER.labels(), context)  # fine on its own
    assert len(set(upper)) == 26
    with pytest.raises(LabelTokenError) as caught:
        label_token_ids(tokenizer, LabelAlphabet.UPPER_LOWER.labels(), context)
    message = str(caught.value)
    assert "'A' and 'a' share token 'a'" in message
    assert f"id {upper[0]}" in message
    assert "RANKD_RERANKER_LABEL_ALPHABET" in message


@pytest.mark.parametrize("backend", ["transformers", "vllm"])
async def test_the_scorer_refuses_to_start_on_a_splitting_tokenizer(tmp_path: Path,
                                                                   backend: str) -> None:
    build_tokenizer(tmp_path, kind="split_labels")  # tokenizer files only: no model is loaded
    # No model weights exist there: the labels are refused before any backend is built.
    config = RerankerConfig(backend=backend, model=str(tmp_path), vllm_url="http://127.0.0.1:9")
    with pytest.raises(LabelTokenError, match="label 'A' is 2 tokens"):
        await ListwiseScorer.create(config)
