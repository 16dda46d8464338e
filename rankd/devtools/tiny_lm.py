"""A tiny causal LM built from scratch in seconds: random Qwen2 weights, a locally trained
byte-level BPE tokenizer and a ChatML chat template. Nothing is downloaded.

``build_tokenizer`` also makes the odd tokenizers that label validation must handle. The tests
(the ``tiny_lm`` fixture) and bench/rerank.py build the model from here.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Literal

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-style: the answer follows the closing special token directly.
INST_TEMPLATE = (
    "{% for message in messages %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endfor %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

TokenizerKind = Literal["bytelevel", "prefix_space", "split_labels", "uncased"]


def _corpus() -> list[str]:
    from retriever.data import sample_catalog_path, sample_queries_path

    lines = sample_catalog_path().read_text(encoding="utf-8").splitlines()
    lines += sample_queries_path().read_text(encoding="utf-8").splitlines()
    lines += ["Query: Candidates: Which candidate fits the query best? Answer with its label alone.",
              "Question: Options: Context: Answer: user assistant system",
              "Candidate: Does the candidate fit the query? Answer yes or no."]
    # Pointwise answers start a line (after the assistant header): whole-word tokens there.
    lines += ["yes", "no"] * 20
    return lines * 4


def build_tokenizer(directory: Path, vocab_size: int = 1024,
                    kind: TokenizerKind = "bytelevel") -> None:
    """Train a tokenizer and save it with a chat template.

    - ``bytelevel``: byte-level BPE with a ChatML template. Every byte is a token, so A-Z and
      a-z are single tokens where the model answers (after ``<|im_start|>assistant\\n``).
    - ``prefix_space``: the same with ``add_prefix_space`` and the merges "ĠA" … "ĠZ" learned, so
      a bare "A" encodes as the one token "ĠA" while the model answers with the token "A": label
      ids must be read where the label stands in the prompt, not from the bare label.
    - ``split_labels``: a SentencePiece-style tokenizer (Metaspace, "▁" prepended after every
      special token) with no merges and a Mistral-style template whose answer follows "[/INST]";
      there every label is two tokens, "▁" and the letter, and validation must refuse to start.
    - ``uncased``: byte-level BPE behind a lowercasing normaliser, so "A" and "a" are one token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "split_labels":
        chars = sorted(set("".join(_corpus())) | set(string.ascii_letters) | {"▁"})
        specials = ["<unk>", "</s>", "[INST]", "[/INST]"]
        vocab = {token: i for i, token in enumerate(specials + [c for c in chars if c != " "])}
        tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                           prepend_scheme="always", split=True)
        tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                       eos_token="</s>", pad_token="</s>",
                                       additional_special_tokens=["[INST]", "[/INST]"])
        fast.chat_template = INST_TEMPLATE
        fast.save_pretrained(directory)
        return

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=kind == "prefix_space")
    tokenizer.decoder = decoders.ByteLevel()
    if kind == "uncased":
        tokenizer.normalizer = normalizers.Lowercase()
    corpus = _corpus()
    if kind == "prefix_space":
        corpus += [" ".join(string.ascii_uppercase)] * 50  # learn the merges "ĠA" … "ĠZ"
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(directory)


def build_tiny_lm(directory: Path, seed: int = 0, hidden_size: int = 128,
                  intermediate_size: int = 256, layers: int = 2) -> Path:
    """Save a randomly initialised 2-layer Qwen2 and its tokenizer into ``directory``.

    Head size 64 and sizes that are multiples of 128 keep vLLM's CPU kernels and 4-bit
    group-128 quantisation happy.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=hidden_size // 64,
        num_key_value_heads=hidden_size // 64,
        max_position_embeddings=4096,
        # Larger than the usual 0.02 so label probabilities differ visibly between labels.
        initializer_range=0.2,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",  # type: ignore[call-arg]
    )
    model = Qwen2ForCausalLM(config)
    model.eval()
    model.save_pretrained(directory)
    return directory
