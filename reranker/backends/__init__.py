"""Scoring backends, chosen by name through a registry (``RANKD_RERANKER_BACKEND``)."""

from __future__ import annotations

from typing import Any

from reranker.backends.base import BackendFactory, LabelLogprobBackend, LabelRead
from reranker.config import NO_RERANKER, RerankerConfig
from reranker.errors import RerankerConfigError
from runtime.batching import BatchObserver


async def _transformers(config: RerankerConfig, tokenizer: Any, observer: BatchObserver | None) -> LabelLogprobBackend:
    from reranker.backends.transformers_backend import TransformersBackend

    return await TransformersBackend.create(config, tokenizer, observer)


async def _vllm(config: RerankerConfig, tokenizer: Any, observer: BatchObserver | None) -> LabelLogprobBackend:
    from reranker.backends.vllm_backend import VllmBackend

    return await VllmBackend.create(config, tokenizer, observer)


async def _openvino(config: RerankerConfig, tokenizer: Any, observer: BatchObserver | None) -> LabelLogprobBackend:
    from reranker.backends.openvino_backend import OpenVinoBackend

    return await OpenVinoBackend.create(config, tokenizer, observer)


# "none" is not a backend: it means retrieval only, and the service then builds no reranker.
BACKENDS: dict[str, BackendFactory] = {
    "transformers": _transformers,
    "vllm": _vllm,
    "openvino": _openvino,
}


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
    "BatchObserver",
    "LabelLogprobBackend",
    "LabelRead",
    "backend_factory",
]
