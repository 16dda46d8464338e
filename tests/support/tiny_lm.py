"""A tiny causal LM built from scratch in seconds: random Qwen2 weights, a locally trained
byte-level BPE tokenizer and a ChatML chat template. Nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    from retriever.data import sample_catalog_path, sample_queries_path

    lines = sample_catalog_path().read_text(encoding="utf-8").splitlines()
    lines += sample_queries_path().read_text(encoding="utf-8").splitlines()
    lines += ["Query: Candidates: Which candidate fits the query best? Answer with its label alone.",
              "Question: Options: Context: Answer: user assistant system"]
    return lines * 4


def build_tokenizer(directory: Path, vocab_size: int = 1024, merge_labels: bool = False) -> None:
    """Train a byte-level BPE tokenizer and save it with a chat template.

    Every byte is a token of a byte-level BPE, so A-Z and a-z are single tokens. With
    ``merge_labels`` the pre-tokenizer adds a prefix space, so a bare "A" becomes two tokens
    ("Ġ" + "A"): a tokenizer on which label validation must refuse to start.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=merge_labels)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer)
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
        torch_dtype="float32",
    )
    model = Qwen2ForCausalLM(config)
    model.eval()
    model.save_pretrained(directory)
    return directory
