"""Domain errors of the reranker library."""

from __future__ import annotations


class RerankerConfigError(RuntimeError):
    """The reranker cannot start with this configuration; the message says what to change."""


class LabelTokenError(RerankerConfigError):
    """A label is not exactly one token of the model's tokenizer, or two labels share a token."""


class TooManyItemsError(ValueError):
    """More items to label than the label alphabet has labels."""

    def __init__(self, count: int, limit: int, field: str = "candidates") -> None:
        super().__init__(f"{field} is {count}, but the reranker has only {limit} labels "
                         "(RANKD_RERANKER_LABEL_ALPHABET)")
        self.count = count
        self.limit = limit
        self.field = field


class PromptTooLongError(ValueError):
    """A rendered prompt is longer than the model can read (or the configured cap)."""

    def __init__(self, tokens: int, limit: int, field: str, setting: str) -> None:
        super().__init__(f"{field} makes a prompt of {tokens} tokens after the chat template, "
                         f"over the limit of {limit} tokens ({setting})")
        self.tokens = tokens
        self.limit = limit
        self.field = field


class ItemTooLongError(ValueError):
    """An item (a document, an option, a passage) is over the per-item token limit."""

    def __init__(self, tokens: int, limit: int, field: str) -> None:
        super().__init__(f"{field} is {tokens} tokens, over the limit of {limit} tokens "
                         "(RANKD_RERANKER_MAX_ITEM_TOKENS; RANKD_RERANKER_LONG_ITEMS=truncate cuts "
                         "it instead)")
        self.tokens = tokens
        self.limit = limit
        self.field = field


class BackendError(RuntimeError):
    """The scoring backend failed, timed out or is unreachable. ``reason`` is a short slug."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class OverBudgetError(ValueError):
    """A request whose work, at the reranker's measured rate, would take longer alone than its
    budget (RANKD_RERANKER_TIMEOUT_S): refused before it is queued, rather than run and timed
    out. ``field`` is the request field whose length makes the work."""

    def __init__(self, estimate_s: float, budget_s: float, field: str = "documents") -> None:
        super().__init__(
            f"{field} would take the reranker about {estimate_s:.1f} s alone at its measured "
            f"rate, over its budget of {budget_s:g} s (RANKD_RERANKER_TIMEOUT_S); send fewer or "
            "shorter documents, or a smaller max_tokens_per_doc")
        self.estimate_s = estimate_s
        self.budget_s = budget_s
        self.field = field
