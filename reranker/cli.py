"""Registers reranker subcommands (quantize) on the ``rankd`` parser."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

from reranker.labels import LabelAlphabet
from reranker.listwise import ListwiseTask

_FALSE = {"0", "false", "no", "off"}


def build_calibration_tasks(index_dir: Path, collection_name: str | None,
                            queries_path: Path | None, samples: int, candidates: int,
                            seed: int = 0) -> tuple[list[ListwiseTask], str]:
    """Rerank tasks over a collection, as /rank would build them: ``samples`` queries (from
    ``queries_path``, or else the collection's own entries standing in as queries), each with its
    ``candidates`` nearest entries (never the query itself) and the collection's instruction.
    Returns the tasks and a one-line description of where they came from."""
    from reranker.config import DEFAULT_INSTRUCTION, DEFAULT_RANK_TEMPLATE
    from reranker.quantize import QuantizeError, read_queries, sample_queries
    from retriever import Embedder, load_collection
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
    embedder = Embedder.load(collection.manifest.embedder)
    # One more than needed, so that an entry standing in as a query can leave itself out.
    hits = collection.search(embedder.encode(queries), candidates + 1)
    instruction = (collection.manifest.instruction
                   or os.environ.get("RANKD_RERANKER_INSTRUCTION", DEFAULT_INSTRUCTION))
    template = os.environ.get("RANKD_RERANKER_RANK_TEMPLATE", DEFAULT_RANK_TEMPLATE)
    tasks: list[ListwiseTask] = []
    for query, row in zip(queries, hits, strict=True):
        items = [hit.text for hit in row if hit.text != query][:candidates]
        tasks.append(ListwiseTask(template=template,
                                  fields={"instruction": instruction, "query": query},
                                  items=items))
    return tasks, source


def _quantize(args: argparse.Namespace) -> int:
    from reranker.errors import RerankerConfigError
    from reranker.models import resolve_model
    from reranker.prompt import PromptRenderer, load_tokenizer
    from reranker.quantize import (
        GROUP_SIZES,
        QuantizeError,
        calibration_prompts,
        check_destination,
        hide_gpus_for_cpu,
        llmcompressor_version,
        quantize,
        select_device,
    )
    from reranker.vllm_cpu import probe_kernels
    from retriever import EmbedderLoadError, IndexIntegrityError

    output = Path(args.output)
    labels = LabelAlphabet(args.label_alphabet).labels()
    try:
        # The cheap refusals first: no quantizer, no GPU, an output already there.
        hide_gpus_for_cpu(args.device)
        llmcompressor_version()
        select_device(args.device)
        check_destination(output, args.overwrite)
        if not 1 <= args.candidates <= len(labels):
            raise QuantizeError(f"--candidates must be 1-{len(labels)} (the labels of "
                                f"--label-alphabet {args.label_alphabet}), got {args.candidates}")
        if args.samples < 1 or args.max_seq_len < 16:
            raise QuantizeError("--samples must be at least 1 and --max-seq-len at least 16")
        index_dir = Path(args.index_dir or os.environ.get("RANKD_INDEX_DIR", "./rankd-index"))
        tasks, source = build_calibration_tasks(
            index_dir, args.collection, Path(args.queries) if args.queries else None,
            args.samples, args.candidates, args.seed)
        if args.group_size not in GROUP_SIZES:
            raise QuantizeError(f"--group-size must be one of {GROUP_SIZES}, got "
                                f"{args.group_size}")
        model = resolve_model(args.model)
        renderer = PromptRenderer(load_tokenizer(model), args.chat_template)
        prompts = calibration_prompts(renderer, tasks, labels)
        # Without a GPU the result is served by vLLM's CPU build, if this CPU has its kernel.
        note = (probe_kernels(os.environ.get("RANKD_VLLM_PYTHON")).w4a16_problem()
                if args.device == "cpu" else None)
        if note:
            print(f"rankd quantize: note: {note}", file=sys.stderr)
        result = quantize(model, output, prompts, device=args.device,
                          max_seq_len=args.max_seq_len, calibration_source=source,
                          overwrite=args.overwrite, group_size=args.group_size,
                          serving_note=note)
    except (QuantizeError, RerankerConfigError, IndexIntegrityError, EmbedderLoadError) as exc:
        print(f"rankd quantize: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    if note:
        print(f"rankd quantize: {output} is written, but {note}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `rankd quantize`."""
    quant = sub.add_parser(
        "quantize",
        help="quantize a causal LM to 4-bit AWQ (W4A16, group 128) for vLLM",
        description=(
            "Quantize a Hugging Face causal LM to 4-bit AWQ (W4A16, group size 128) with "
            "llm-compressor, calibrated on rerank prompts built from a collection, into a "
            "directory that vLLM serves as it is. Needs the [quant] extra (see "
            "scripts/setup_quant.sh) and, unless --device cpu, an NVIDIA GPU."
        ),
    )
    quant.add_argument("--model", required=True,
                       help="full-precision instruct model: hub id or local directory")
    quant.add_argument("--output", required=True, help="directory to write the quantized model to")
    quant.add_argument("--index-dir", help="default: $RANKD_INDEX_DIR or ./rankd-index")
    quant.add_argument("--collection",
                       help="collection whose texts calibrate (default: the only one in --index-dir)")
    quant.add_argument("--queries",
                       help="calibration queries: JSONL with a 'query' field, or one per line "
                            "(default: the collection's own entries stand in as queries)")
    quant.add_argument("--samples", type=int, default=128,
                       help="calibration prompts (default 128)")
    quant.add_argument("--candidates", type=int, default=25,
                       help="candidates per calibration prompt (default 25)")
    quant.add_argument("--max-seq-len", type=int, default=2048,
                       help="tokens kept per calibration prompt (default 2048)")
    quant.add_argument("--label-alphabet", choices=[a.value for a in LabelAlphabet],
                       default=os.environ.get("RANKD_RERANKER_LABEL_ALPHABET", LabelAlphabet.UPPER.value),
                       help="default: $RANKD_RERANKER_LABEL_ALPHABET or upper")
    quant.add_argument("--chat-template", action=argparse.BooleanOptionalAction,
                       default=os.environ.get("RANKD_RERANKER_CHAT_TEMPLATE", "true").lower()
                       not in _FALSE,
                       help="wrap prompts in the model's chat template, as the reranker does "
                            "(default: $RANKD_RERANKER_CHAT_TEMPLATE or true)")
    quant.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                       help="cuda (default) needs an NVIDIA GPU; cpu is for small models")
    quant.add_argument("--group-size", type=int, default=128,
                       help="input channels per scale and zero point: 128 (default), 64 or 32; "
                            "it must divide every layer's width (SmolLM2-135M needs 64)")
    quant.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    quant.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    quant.set_defaults(handler=_quantize)
