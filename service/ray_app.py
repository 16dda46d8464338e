"""rankd as a Ray Serve application: an ingress, a retrieval deployment and a reranker
deployment, each with replicas and autoscaling of its own (deploy/ray/serve.yaml).

- ``Retrieval`` runs ``LocalRetrieval``: the embedder and every collection, behind the search
  micro-batcher. Every replica loads the same collections, from the same files or the same
  Milvus, so they answer alike.
- ``Reranker`` runs the configured scoring backend (``RANKD_RERANKER_BACKEND``): the
  transformers model in the replica, or a client of a vLLM endpoint on a GPU cluster. It sees
  token ids only: prompts are rendered in the ingress.
- ``RankdIngress`` is the FastAPI app of ``create_app``, built in the replica, whose engine
  retrieves through the retrieval deployment and scores through the reranker deployment. Its
  routes, errors and limits are the single-process service's.

Start it with ``serve run deploy/ray/serve.yaml`` (or ``serve deploy`` against a running
cluster); ``build_app`` is the import path the config names. No cluster logic is written here:
routing, replicas, autoscaling and the HTTP proxy are Ray Serve's.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import FastAPI
from ray import serve
from ray.exceptions import RayError, RayTaskError
from ray.serve.handle import DeploymentHandle

from reranker.backends import LabelLogprobBackend, LabelRead
from reranker.errors import BackendError, TooManyItemsError
from reranker.listwise import load_model_tokenizer, start_backend
from retriever.search import SearchQuery
from retriever.vocabulary import CollectionUnavailableError, Hit, Manifest
from runtime.batching import QueueFullError
from service.app import create_app
from service.errors import ServiceError
from service.retrieval import LocalRetrieval
from service.settings import Settings, load_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors a deployment raises that the ingress answers as the single-process service would.
_PASSED_THROUGH = (ServiceError, QueueFullError, BackendError, TooManyItemsError,
                   CollectionUnavailableError)


def _settings(overrides: dict[str, Any]) -> Settings:
    """Settings from the environment of the replica, with the application's ``settings``
    argument on top."""
    return load_settings(**overrides)


async def _remote(call: Awaitable[T], failed: Callable[[RayError], Exception]) -> T:
    """The result of a deployment call. An error the deployment raised that the ingress knows
    how to answer (a 429, a 503, a 422) is raised as it is, without Ray's wrapping and its
    remote traceback; any other failure of the call becomes ``failed(exc)``."""
    try:
        return await call
    except RayError as exc:
        cause = exc.cause if isinstance(exc, RayTaskError) else None
        if isinstance(cause, _PASSED_THROUGH):
            raise cause from None
        raise failed(exc) from exc


class RetrievalReplica:
    # Ray Serve awaits an async constructor; the loading runs in the replica's event loop.
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        self.stage = await LocalRetrieval.start(_settings(settings))

    def describe(self) -> dict[str, Any]:
        return {"embedder": self.stage.embedder_name, "manifests": self.stage.manifests,
                "errors": self.stage.errors}

    async def search(self, queries: list[SearchQuery]) -> list[list[Hit]]:
        return await self.stage.search(queries)

    async def health(self) -> dict[str, str | None]:
        return await self.stage.health()

    async def __del__(self) -> None:
        await self.stage.close()


class RerankerReplica:
    async def __init__(self, settings: dict[str, Any]) -> None:  # type: ignore[misc]
        config = _settings(settings).reranker
        location, tokenizer = await load_model_tokenizer(config)
        self.backend = await start_backend(config.model_copy(update={"model": location}),
                                           tokenizer)

    async def label_logprobs(self, reads: list[LabelRead]) -> list[list[float]]:
        return await self.backend.label_logprobs(reads)

    async def health(self) -> str | None:
        return await self.backend.health()

    async def __del__(self) -> None:
        await self.backend.close()


class RemoteRetrieval:
    """The engine's retrieval stage, answered by the retrieval deployment."""

    def __init__(self, handle: DeploymentHandle, described: dict[str, Any]) -> None:
        self.handle = handle
        self.embedder_name: str = described["embedder"]
        self.manifests: dict[str, Manifest] = described["manifests"]
        self.errors: dict[str, str] = described["errors"]

    @classmethod
    async def connect(cls, handle: DeploymentHandle) -> RemoteRetrieval:
        return cls(handle, await handle.describe.remote())

    async def search(self, queries: Sequence[SearchQuery]) -> list[list[Hit]]:
        return await _remote(self.handle.search.remote(list(queries)),
                             lambda exc: CollectionUnavailableError(
                                 f"the retrieval deployment failed: {type(exc).__name__}"))

    async def health(self) -> dict[str, str | None]:
        try:
            problems: dict[str, str | None] = await self.handle.health.remote()
        except RayError as exc:
            return dict.fromkeys(self.manifests,
                                 f"the retrieval deployment failed: {type(exc).__name__}")
        return problems

    async def close(self) -> None:
        """The deployment outlives the ingress replica: nothing to close here."""


class RemoteBackend:
    """The scorer's backend, answered by the reranker deployment."""

    def __init__(self, handle: DeploymentHandle, runs: str) -> None:
        self.handle = handle
        self.name = f"ray-serve ({runs})"
        self.detail = "the Ray Serve reranker deployment"
        self.context_length: int | None = None  # the deployment loads the same model's config

    async def start(self) -> None:
        problem = await self.health()
        if problem:
            log.warning("reranker deployment not healthy at start: %s", problem)

    async def label_logprobs(self, reads: Sequence[LabelRead]) -> list[list[float]]:
        return await _remote(self.handle.label_logprobs.remote(list(reads)),
                             lambda exc: BackendError("unavailable", "the reranker deployment "
                                                      f"failed: {type(exc).__name__}"))

    def check_capacity(self, reads: int) -> None:
        """The server queues whatever it is sent; nothing is too large to queue here."""

    async def health(self) -> str | None:
        try:
            problem: str | None = await self.handle.health.remote()
        except RayError as exc:
            return f"the reranker deployment failed: {type(exc).__name__}"
        return problem

    async def close(self) -> None:
        """The deployment outlives the ingress replica: nothing to close here."""


class IngressReplica:
    def __init__(self, retrieval: DeploymentHandle, reranker: DeploymentHandle | None,
                 settings: dict[str, Any]) -> None:
        self.retrieval = retrieval
        self.reranker = reranker
        self.overrides = settings

    async def __serve_build_asgi_app__(self) -> FastAPI:
        settings = _settings(self.overrides)
        stage = await RemoteRetrieval.connect(self.retrieval)
        backend: LabelLogprobBackend | None = None
        if self.reranker is not None:
            backend = RemoteBackend(self.reranker, settings.reranker.backend)
        return create_app(settings, retrieval=stage, reranker_backend=backend)


# The deployments' names are the ones deploy/ray/serve.yaml configures.
Retrieval = serve.deployment(name="Retrieval")(RetrievalReplica)
Reranker = serve.deployment(name="Reranker")(RerankerReplica)
RankdIngress = serve.deployment(name="RankdIngress")(serve.ingress()(IngressReplica))


def build_app(args: dict[str, Any]) -> Any:
    """The application, for ``serve run``/``serve deploy`` (``import_path:
    service.ray_app:build_app``). ``args["settings"]`` holds rankd settings by field name
    (``{"index_dir": "/data/index", "reranker": {"backend": "transformers"}}``); the
    replicas' environment (``RANKD_*``) supplies the rest."""
    overrides: dict[str, Any] = dict(args.get("settings") or {})
    settings = _settings(overrides)  # fail here, once, on a bad configuration
    retrieval = Retrieval.bind(overrides)
    reranker = Reranker.bind(overrides) if settings.reranker.enabled else None
    return RankdIngress.bind(retrieval, reranker, overrides)
