"""Typed configuration: every setting is an environment variable with the RANKD_ prefix."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import SettingsConfigDict

from reranker.config import RerankerConfig
from retriever.config import RetrieverSettings
from runtime.logs import LogSettings
from runtime.settings import comma_separated, read_settings


class OnIndexError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


class Settings(LogSettings, RetrieverSettings):
    """rankd's settings: the retrieval stage's (retriever/config.py) and the log level's, the
    service's own below, and the reranker's nested. Each field is read from
    ``RANKD_<FIELD NAME>``, and each field of the nested reranker config from
    ``RANKD_RERANKER_<FIELD NAME>``."""

    # RANKD_RERANKER_VLLM_URL is reranker.vllm_url: the nested model's field names keep their
    # underscores because the name is split once only, after the prefix.
    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True,
                                      env_nested_delimiter="_", env_nested_max_split=1)

    pipeline_dir: Path | None = Field(None, description="A `rankd train-pipeline --output` directory: its index, fine-tuned embedder and trained reranker are served (RANKD_INDEX_DIR, RANKD_EMBEDDER_MODEL and RANKD_RERANKER_MODEL come from it, and one set to anything else refuses the start).")
    on_index_error: OnIndexError = Field(OnIndexError.FAIL, description="A damaged collection at start-up: `fail` refuses to start, `skip` serves the rest and reports it in /ready.")

    # Server
    host: str = Field("127.0.0.1", description="Bind address for `rankd serve`.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `rankd serve`.")

    # Request limits
    max_query_chars: int = Field(4000, ge=1, description="Longest accepted query, in characters.")
    max_top_k: int = Field(100, ge=1, description="Largest accepted `top_k`.")
    default_candidates: int = Field(25, ge=1, description="Candidates passed to the reranker when a request does not say; at most the labels of RANKD_RERANKER_LABEL_ALPHABET, which cap `candidates`. Unset, a trained model's rankd_reranker.json sets it to the N it was trained and its fusion chosen at; set, it wins with a warning.")
    max_batch_queries: int = Field(64, ge=1, description="Most queries in one /rank/batch request.")

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body, in bytes (413 beyond).")
    max_header_bytes: int = Field(16_384, ge=1024, description="Largest accepted request line and headers together, in bytes; a longer head closes the connection with 400 before any of it reaches the app (`rankd serve`).")
    header_timeout_s: float = Field(10.0, gt=0, description="Seconds a connection has to send a complete request head, from its start or the end of the previous response; then 408 and closed (`rankd serve`).")
    body_timeout_s: float = Field(30.0, gt=0, description="Seconds a request body may pause between two of its parts before the request gets 408.")
    max_rerank_documents: int = Field(1000, ge=1, description="Most documents in one /v1/rerank request.")
    max_document_chars: int = Field(20000, ge=1, description="Longest accepted /answer option or context passage, in characters. /v1/rerank documents of any length are cut to what the model reads instead (RANKD_RERANKER_LONG_ITEMS=truncate, the default); with refuse, this limit holds for them too.")

    # Security
    api_key: SecretStr | None = Field(None, description="Comma-separated API keys; when set, every route but /health, /ready and /metrics needs `Authorization: Bearer <key>`.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty (the default) turns CORS off.")

    # Reranker: RANKD_RERANKER_<FIELD> (reranker/config.py)
    reranker: RerankerConfig = Field(default_factory=RerankerConfig, description="The reranker.")
    rerank_required: bool = Field(False, description="When the reranker fails: false answers with the retrieval order and a warning; true answers 503.")

    # Multiple-choice answering (/answer)
    answer_context_tokens: int = Field(1024, ge=0, description="Token budget for the passages in an /answer prompt.")
    answer_query_with_options: bool = Field(False, description="Append the options to the question when retrieving /answer passages.")
    max_answer_passages: int = Field(10, ge=0, description="Largest accepted `passages` in /answer.")

    @property
    def api_keys(self) -> list[str]:
        return comma_separated(self.api_key.get_secret_value() if self.api_key else "")

    @property
    def cors_origin_list(self) -> list[str]:
        return comma_separated(self.cors_origins)

    @model_validator(mode="before")
    @classmethod
    def _from_pipeline(cls, data: Any) -> Any:
        """RANKD_PIPELINE_DIR fills the index, the embedder and the reranker model."""
        if not isinstance(data, dict) or not data.get("pipeline_dir"):
            return data
        from service.pipeline import read_pipeline

        layout = read_pipeline(Path(data["pipeline_dir"]))
        reranker = data.get("reranker") or {}
        if isinstance(reranker, BaseModel):
            reranker = reranker.model_dump(exclude_unset=True)
        reranker = dict(reranker)
        given = {"RANKD_INDEX_DIR": (data, "index_dir", layout.index_dir),
                 "RANKD_EMBEDDER_MODEL": (data, "embedder_model", layout.embedder),
                 "RANKD_RERANKER_MODEL": (reranker, "model", layout.reranker)}
        for variable, (source, key, stage) in given.items():
            value = source.get(key)
            if key == "model" and value is not None and layout.quantized_reranker(str(value)):
                continue  # its reranker, 4-bit for vLLM (`rankd quantize`), inside it
            if value is not None and Path(str(value)).expanduser().resolve() != stage:
                raise ValueError(f"{variable}={value} contradicts RANKD_PIPELINE_DIR, whose "
                                 f"{key} is {stage}; unset one of them")
            source[key] = str(stage)
        return {**data, "reranker": reranker}

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.api_key is not None and not self.api_keys:
            raise ValueError("RANKD_API_KEY is set but holds no key (only blanks and commas); "
                             "set one or more keys, or unset it to serve without authentication")
        labels = self.reranker.max_items
        if self.reranker.enabled and self.default_candidates > labels:
            raise ValueError(
                f"RANKD_DEFAULT_CANDIDATES ({self.default_candidates}) exceeds the {labels} labels "
                f"of RANKD_RERANKER_LABEL_ALPHABET={self.reranker.label_alphabet}; lower it or "
                "choose upper_lower (52 labels)")
        return self


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment; a bad value is SettingsError, one line each."""
    return read_settings(Settings, **overrides)
