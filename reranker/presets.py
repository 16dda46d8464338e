"""Presets for known reranker families: the scoring mode, prompt and labels their model cards
use, so a user sets ``RANKD_RERANKER_PRESET`` instead of writing a byte-exact template.

- ``qwen3-reranker`` (Qwen/Qwen3-Reranker-0.6B, -4B, -8B): pointwise, the card's system prompt,
  its ``<Instruct>: / <Query>: / <Document>:`` lines and the empty think block, written as the
  card writes them (no chat template applied on top), read as P("yes") against P("no"), which
  is the card's score (a softmax over the logits of "no" and "yes" at the last position).

Not a preset: ``BAAI/bge-reranker-v2-gemma``. Its card scores a pair by the raw logit of "Yes"
at the last position, not by a probability renormalised over labels: the label-logprob path
(the probability of one label against the others) orders candidates differently, so a preset
would serve it under a score its authors did not use.

Precedence, field by field: an explicit ``RANKD_RERANKER_*`` setting, then a trained model's
``rankd_reranker.json`` (``reranker.trained``), then the preset, then rankd's defaults.
"""

from __future__ import annotations

from typing import Any

from reranker.config import Preset, RerankerConfig, Scoring

# Qwen3-Reranker's model card (the transformers example): prefix, format_instruction, suffix.
QWEN3_SYSTEM = ("Judge whether the Document meets the requirements based on the Query and the "
                'Instruct provided. Note that the answer can only be "yes" or "no".')
QWEN3_PREFIX = f"<|im_start|>system\n{QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n"
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = ("Given a web search query, retrieve relevant passages that answer the "
                     "query")
QWEN3_TEMPLATE = (QWEN3_PREFIX + "<Instruct>: {instruction}\n<Query>: {query}\n"
                  "<Document>: {item}" + QWEN3_SUFFIX)

PRESETS: dict[Preset, dict[str, Any]] = {
    Preset.QWEN3_RERANKER: {"scoring": Scoring.POINTWISE, "chat_template": False,
                            "pointwise_template": QWEN3_TEMPLATE,
                            "instruction": QWEN3_INSTRUCTION},
}


def preset_values(config: RerankerConfig, keep: set[str] | frozenset[str] = frozenset(),
                  ) -> dict[str, Any]:
    """The fields ``config.preset`` sets that neither the operator (``model_fields_set``) nor
    ``keep`` (a trained model's settings) already set."""
    if config.preset is None:
        return {}
    return {name: value for name, value in PRESETS[config.preset].items()
            if name not in config.model_fields_set and name not in keep}


def with_preset(config: RerankerConfig) -> RerankerConfig:
    """``config`` with its preset's fields filled where the operator set none."""
    return config.model_copy(update=preset_values(config))
