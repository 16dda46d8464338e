"""Second stage of rankd: listwise LLM reranking by single-token label logprobs.

A library: nothing here knows about HTTP.
"""

from reranker.backends import BACKENDS, LabelLogprobBackend, LabelRead
from reranker.config import (
    DEFAULT_ANSWER_TEMPLATE,
    DEFAULT_INSTRUCTION,
    DEFAULT_RANK_TEMPLATE,
    NO_RERANKER,
    RerankerConfig,
)
from reranker.errors import BackendError, LabelTokenError, RerankerConfigError, TooManyItemsError
from reranker.labels import LabelAlphabet, label_token_ids
from reranker.listwise import ListwiseScorer, ListwiseScores, ListwiseTask, OrderTrace, renormalise

__all__ = [
    "BACKENDS",
    "DEFAULT_ANSWER_TEMPLATE",
    "DEFAULT_INSTRUCTION",
    "DEFAULT_RANK_TEMPLATE",
    "NO_RERANKER",
    "BackendError",
    "LabelAlphabet",
    "LabelLogprobBackend",
    "LabelRead",
    "LabelTokenError",
    "ListwiseScorer",
    "ListwiseScores",
    "ListwiseTask",
    "OrderTrace",
    "RerankerConfig",
    "RerankerConfigError",
    "TooManyItemsError",
    "label_token_ids",
    "renormalise",
]
