"""Label alphabets and their validation against a tokenizer."""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Any

from reranker.errors import LabelTokenError

LABEL_SETTING = "RANKD_RERANKER_LABEL_ALPHABET"
ALPHABET_REMEDY = (f"choose another alphabet with {LABEL_SETTING} or another model with "
                   "RANKD_RERANKER_MODEL")
POINTWISE_REMEDY = ("score listwise (RANKD_RERANKER_SCORING=listwise) or choose another model "
                    "with RANKD_RERANKER_MODEL")


class LabelAlphabet(StrEnum):
    UPPER = "upper"  # A-Z, 26 labels
    UPPER_LOWER = "upper_lower"  # A-Z then a-z, 52 labels

    def labels(self) -> list[str]:
        if self is LabelAlphabet.UPPER:
            return list(string.ascii_uppercase)
        return list(string.ascii_uppercase + string.ascii_lowercase)


# The largest alphabet's size: no prompt labels more items, nor runs in more distinct orders.
MAX_LABELS = max(len(alphabet.labels()) for alphabet in LabelAlphabet)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def label_tokens(tokenizer: Any, label: str, context: str = "") -> tuple[list[int], bool]:
    """The tokens ``label`` adds when it follows ``context``, and whether the context's own tokens
    stay as they are (False when the label merges with the end of the context)."""
    before = _encode(tokenizer, context) if context else []
    after = _encode(tokenizer, context + label)
    intact = after[: len(before)] == before
    common = 0
    while common < min(len(before), len(after)) and before[common] == after[common]:
        common += 1
    return after[common:], intact


def label_token_ids(tokenizer: Any, labels: list[str], context: str = "",
                    remedy: str = ALPHABET_REMEDY) -> list[int]:
    """The single token id of each label, in the exact form the model answers it.

    ``context`` is a rendered prompt that ends where the answer starts (for chat models, the
    assistant turn's header). A label is checked as the tokenizer splits ``context + label``, so a
    tokenizer that prepends a space marker to text after a special token, or one that merges a
    label with a preceding character, is judged by the tokens the model really reads and writes.
    Raises ``LabelTokenError`` naming the label, its tokens and ``remedy`` (what to change) when
    a label is not exactly one token or two labels share a token.
    """
    ids: list[int] = []
    owner: dict[int, str] = {}
    where = "where the model answers" if context else "on its own"
    for label in labels:
        tokens, intact = label_tokens(tokenizer, label, context)
        if not intact:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise LabelTokenError(
                f"label {label!r} merges with the end of the prompt into tokens {pieces} (ids "
                f"{tokens}) for this tokenizer, so it is not one token of its own; {remedy}"
            )
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise LabelTokenError(
                f"label {label!r} is {len(tokens)} tokens {pieces} (ids {tokens}) {where} for "
                f"this tokenizer, not one; {remedy}"
            )
        token = tokens[0]
        if token in owner:
            piece = tokenizer.convert_ids_to_tokens([token])[0]
            raise LabelTokenError(
                f"labels {owner[token]!r} and {label!r} share token {piece!r} (id {token}) {where} "
                f"for this tokenizer, so their probabilities cannot be told apart; {remedy}"
            )
        owner[token] = label
        ids.append(token)
    return ids
