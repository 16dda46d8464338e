"""The small Protocol every scoring backend implements."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from reranker.config import RerankerConfig
from runtime.batching import BatchObserver


@dataclass(frozen=True)
class LabelRead:
    """One next-token read: the prompt's token ids, and the label tokens whose logprobs we want."""

    prompt_token_ids: list[int]
    label_token_ids: list[int]


class LabelLogprobBackend(Protocol):
    name: str
    # Where and how it computes, for /ready and the start-up log: the device and dtype that
    # were chosen, or the server it asks.
    detail: str
    # The longest prompt, in tokens, that the backend takes, where it knows better than the
    # model's config (a vLLM server's max_model_len); None: read the model's config.
    context_length: int | None

    async def start(self) -> None: ...

    async def label_logprobs(self, reads: Sequence[LabelRead]) -> list[list[float]]:
        """For each read, the logprob of each label token at the next position.

        Values may be full-vocabulary or already restricted to the labels; callers renormalise.
        Raises ``BackendError`` on failure or timeout.
        """
        ...

    def check_capacity(self, reads: int) -> None:
        """Raise ``runtime.batching.JobTooLargeError`` when a request of ``reads`` prompts could
        never be taken, however idle the backend (its queue is smaller)."""
        ...

    async def health(self) -> str | None:
        """None when healthy, else a one-line reason."""
        ...

    async def close(self) -> None: ...


BackendFactory = Callable[[RerankerConfig, Any, BatchObserver | None],
                          Awaitable[LabelLogprobBackend]]
