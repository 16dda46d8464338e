"""The reranker library's configuration, independent of how the service reads its settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from reranker.labels import LabelAlphabet

DEFAULT_INSTRUCTION = (
    "You rank candidates for a query. Read the query and the labelled candidates, then choose "
    "the one candidate that fits the query best."
)

# Everything that does not depend on candidate order ({instruction}, {query}) comes before the
# candidates so that both orders share a prefix that vLLM's prefix cache reuses.
DEFAULT_RANK_TEMPLATE = (
    "{instruction}\n\n"
    "Query:\n{query}\n\n"
    "Candidates:\n{items}\n\n"
    "Which candidate fits the query best? Answer with its label ({first_label}-{last_label}) "
    "alone."
)


@dataclass(frozen=True)
class RerankerConfig:
    model: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    vllm_url: str = "http://127.0.0.1:8001"
    vllm_model_name: str | None = None
    timeout_s: float = 30.0
    retries: int = 1
    label_alphabet: LabelAlphabet = LabelAlphabet.UPPER
    use_chat_template: bool = True
    max_batch_size: int = 16
    batch_wait_ms: float = 2.0
    max_queue_depth: int = 1024
    # The rank prompt template; as plain text (no chat template) its ending is where labels are
    # checked to be single tokens.
    rank_template: str = DEFAULT_RANK_TEMPLATE
    # Orders each prompt runs in when a request does not say (see listwise.order_permutations).
    default_orders: int = 2
    # Where GGUF files are converted to model directories (None: ~/.cache/rankd/models).
    cache_dir: Path | None = None
    # Torch intra-op threads of the in-process reranker's worker; 0 keeps the process's.
    threads: int = 0
