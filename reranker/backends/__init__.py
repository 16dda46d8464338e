"""Scoring backends, chosen by name through a registry (``RANKD_RERANKER_BACKEND``)."""

from __future__ import annotations

from typing import Any

from reranker.backends.base import (
    BackendFactory,
    Batcher,
    LabelLogprobBackend,
    LabelRead,
    MakeBatcher,
)
from reranker.config import RerankerConfig
from reranker.errors import RerankerConfigError


async def _transformers(config: RerankerConfig, tokenizer: Any, make_batcher: MakeBatcher) -> LabelLogprobBackend:
    from reranker.backends.transformers_backend import TransformersBackend

    return await TransformersBackend.create(config, tokenizer, make_batcher)


async def _vllm(config: RerankerConfig, tokenizer: Any, make_batcher: MakeBatcher) -> LabelLogprobBackend:
    from reranker.backends.vllm_backend import VllmBackend

    return await VllmBackend.create(config, tokenizer, make_batcher)


# "none" is not a backend: it means retrieval only, and the service then builds no reranker.
BACKENDS: dict[str, BackendFactory] = {
    "transformers": _transformers,
    "vllm": _vllm,
}
NO_RERANKER = "none"


def backend_factory(name: str) -> BackendFactory:
    try:
        return BACKENDS[name]
    except KeyError:
        choices = ", ".join([NO_RERANKER, *BACKENDS])
        raise RerankerConfigError(
            f"unknown reranker backend {name!r}; set RANKD_RERANKER_BACKEND to one of: {choices}"
        ) from None


__all__ = [
    "BACKENDS",
    "NO_RERANKER",
    "BackendFactory",
    "Batcher",
    "LabelLogprobBackend",
    "LabelRead",
    "MakeBatcher",
    "backend_factory",
]
