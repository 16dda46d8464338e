"""Label alphabets and their validation against a tokenizer."""

from __future__ import annotations

import string
from enum import StrEnum
from typing import Any

from reranker.errors import LabelTokenError


class LabelAlphabet(StrEnum):
    UPPER = "upper"  # A-Z, 26 labels
    UPPER_LOWER = "upper_lower"  # A-Z then a-z, 52 labels

    def labels(self) -> list[str]:
        if self is LabelAlphabet.UPPER:
            return list(string.ascii_uppercase)
        return list(string.ascii_uppercase + string.ascii_lowercase)


def label_token_ids(tokenizer: Any, labels: list[str], setting: str = "RANKD_LABEL_ALPHABET") -> list[int]:
    """The single token id of each label, in the form the model generates it as its answer.

    The answer is read at the first position of the assistant turn, where the label stands alone
    with no leading space, so that is the form checked here.
    """
    ids: list[int] = []
    owner: dict[int, str] = {}
    for label in labels:
        tokens = tokenizer.encode(label, add_special_tokens=False)
        if len(tokens) != 1:
            pieces = tokenizer.convert_ids_to_tokens(tokens)
            raise LabelTokenError(
                f"label {label!r} is {len(tokens)} tokens {pieces} (ids {tokens}) for this "
                f"tokenizer, not one; choose another alphabet with {setting} or another model"
            )
        token = tokens[0]
        if token in owner:
            raise LabelTokenError(
                f"labels {owner[token]!r} and {label!r} share token id {token}; choose another "
                f"alphabet with {setting}"
            )
        owner[token] = label
        ids.append(token)
    return ids
