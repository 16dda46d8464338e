"""Registers the reranker's subcommands on the ``rankd`` parser: ``quantize`` (4-bit AWQ for
vLLM) and ``train-reranker``."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from reranker.labels import LabelAlphabet
from retriever.config import RetrieverSettings
from runtime.settings import SettingsError, describe, read_settings


def _quantize(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from reranker.config import RerankerConfig
    from reranker.errors import RerankerConfigError
    from reranker.models import resolve_model
    from reranker.prompt import PromptRenderer, load_tokenizer
    from reranker.quantize import (
        GROUP_SIZES,
        QuantizeError,
        QuantizeSettings,
        build_calibration_tasks,
        calibration_prompts,
        check_destination,
        hide_gpus_for_cpu,
        llmcompressor_version,
        quantize,
        select_device,
        training_queries,
    )
    from reranker.trained import (
        CANDIDATES_FIELD,
        carried_settings,
        read_served_settings,
        with_trained_settings,
    )
    from reranker.vllm_cpu import probe_kernels
    from retriever import EmbedderLoadError, IndexIntegrityError

    output = Path(args.output)
    # The prompt options given here count as explicit settings, as RANKD_RERANKER_* do.
    explicit: dict[str, object] = {}
    if args.label_alphabet:
        explicit["label_alphabet"] = args.label_alphabet
    if args.chat_template is not None:
        explicit["chat_template"] = args.chat_template
    try:
        # Read once: the model's serving settings by serve's precedence (explicit >
        # rankd_reranker.json > preset > defaults), through serve's own reader.
        reranker, trained = with_trained_settings(
            RerankerConfig.from_env(model=args.model, **explicit))
        retrieval = read_settings(RetrieverSettings)
        tools = read_settings(QuantizeSettings)
    except ValidationError as exc:
        print(describe(exc, "RANKD_RERANKER_"), file=sys.stderr)
        return 2
    except (SettingsError, RerankerConfigError) as exc:
        print(f"rankd quantize: {exc}", file=sys.stderr)
        return 2
    labels = reranker.label_alphabet.labels()
    source_settings = read_served_settings(args.model, reranker.settings_file)
    candidates = args.candidates or (source_settings or {}).get(CANDIDATES_FIELD) or 25
    served_as = trained.describe() or "as configured (the model has no rankd_reranker.json)"
    try:
        # The cheap refusals first: no quantizer, no GPU, an output already there.
        hide_gpus_for_cpu(args.device)
        llmcompressor_version()
        select_device(args.device)
        check_destination(output, args.overwrite)
        if not 1 <= candidates <= len(labels):
            raise QuantizeError(f"--candidates must be 1-{len(labels)} (the labels of "
                                f"--label-alphabet {reranker.label_alphabet}), got {candidates}")
        if args.samples < 1 or args.max_seq_len < 16:
            raise QuantizeError("--samples must be at least 1 and --max-seq-len at least 16")
        index_dir = Path(args.index_dir or retrieval.index_dir)
        queries = Path(args.queries) if args.queries else training_queries(args.model)
        tasks, source = build_calibration_tasks(index_dir, args.collection, queries,
                                                args.samples, candidates, args.seed, reranker)
        if args.group_size not in GROUP_SIZES:
            raise QuantizeError(f"--group-size must be one of {GROUP_SIZES}, got "
                                f"{args.group_size}")
        model = resolve_model(args.model)
        renderer = PromptRenderer(load_tokenizer(model), reranker.chat_template)
        prompts = calibration_prompts(renderer, tasks, labels, reranker)
        source = f"{reranker.scoring.value} prompts; {source}"
        print(f"rankd quantize: calibrating on {len(prompts)} {reranker.scoring.value} prompts; "
              f"serving settings {served_as}", file=sys.stderr)
        # Without a GPU the result is served by vLLM's CPU build, if this CPU has its kernel.
        note = (probe_kernels(tools.vllm_python).w4a16_problem()
                if args.device == "cpu" else None)
        if note:
            print(f"rankd quantize: note: {note}", file=sys.stderr)
        result = quantize(model, output, prompts, device=args.device,
                          max_seq_len=args.max_seq_len, calibration_source=source,
                          overwrite=args.overwrite, group_size=args.group_size,
                          serving_note=note,
                          serving=carried_settings(reranker, source_settings),
                          served_as=served_as)
    except (QuantizeError, RerankerConfigError, IndexIntegrityError, EmbedderLoadError) as exc:
        print(f"rankd quantize: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(asdict(result)))
    if note:
        print(f"rankd quantize: {output} is written, but {note}", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    register_quantize(sub)
    register_train(sub)


def register_quantize(sub: argparse._SubParsersAction) -> None:
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
                       help="calibration queries: JSONL with a 'query' field, Eedi's CSV, or "
                            "one per line (default: a `rankd train-reranker` output's own "
                            "validation questions, else the collection's entries stand in)")
    quant.add_argument("--samples", type=int, default=128,
                       help="calibration prompts (default 128)")
    quant.add_argument("--candidates", type=int, default=None,
                       help="candidates per calibration list (default: the N the model was "
                            "trained at, from its rankd_reranker.json, else 25)")
    quant.add_argument("--max-seq-len", type=int, default=2048,
                       help="tokens kept per calibration prompt (default 2048)")
    quant.add_argument("--label-alphabet", choices=[a.value for a in LabelAlphabet],
                       help="default: the model's rankd_reranker.json, "
                            "$RANKD_RERANKER_LABEL_ALPHABET or upper; one that contradicts the "
                            "file refuses to start, as in `rankd serve`")
    quant.add_argument("--chat-template", action=argparse.BooleanOptionalAction, default=None,
                       help="wrap prompts in the model's chat template, as the reranker does "
                            "(default: the model's rankd_reranker.json, "
                            "$RANKD_RERANKER_CHAT_TEMPLATE or true)")
    quant.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                       help="cuda (default) needs an NVIDIA GPU; cpu is for small models")
    quant.add_argument("--group-size", type=int, default=128,
                       help="input channels per scale and zero point: 128 (default), 64 or 32; "
                            "it must divide every layer's width (SmolLM2-135M needs 64)")
    quant.add_argument("--seed", type=int, default=0, help="calibration sampling seed")
    quant.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    quant.set_defaults(handler=_quantize)


def _train_reranker(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from reranker.config import RerankerConfig
    from reranker.errors import BackendError, RerankerConfigError
    from reranker.presets import with_preset
    from reranker.training import (
        RECIPE_SCORING,
        CandidateOrder,
        ExampleOrders,
        MissingPositive,
        RerankerTrainingConfig,
        RerankerTrainingError,
        TuningMethod,
        train_reranker,
    )
    from retriever.catalog import CatalogError, read_catalog
    from retriever.eedi import DEFAULT_QUERY_TEMPLATE
    from retriever.embedder import EmbedderLoadError
    from retriever.pairs import TrainingError, read_pairs

    try:
        overrides: dict[str, object] = {"model": args.model} if args.model else {}
        if args.scoring:
            overrides["scoring"] = args.scoring
        reranker = with_preset(RerankerConfig.from_env(**overrides))
        if "scoring" not in reranker.model_fields_set:
            reranker = reranker.model_copy(update={"scoring": RECIPE_SCORING})
        retrieval = read_settings(RetrieverSettings)
        config = RerankerTrainingConfig(
            output_dir=Path(args.output), reranker=reranker,
            retriever=args.retriever or retrieval.embedder_model, retrieval=retrieval,
            fold_retrievers=tuple(args.fold_retrievers or ()),
            device=args.device, candidates=args.candidates, min_candidates=args.min_candidates,
            examples=args.examples, candidate_order=CandidateOrder(args.candidate_order),
            example_orders=ExampleOrders(args.example_orders),
            missing_positive=MissingPositive(args.missing_positive),
            random_negatives=args.random_negatives,
            max_tokens=args.max_tokens, epochs=args.epochs, learning_rate=args.lr,
            warmup_ratio=args.warmup, batch_size=args.batch_size,
            gradient_accumulation=args.gradient_accumulation, method=TuningMethod(args.method),
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_layers=args.lora_layers,
            train_layers=args.train_layers,
            validation_fraction=args.validation_fraction, test_fraction=args.test_fraction,
            fusion_queries=args.fusion_queries,
            eval_queries=args.eval_queries,
            curve_points=args.curve_points, curve_queries=args.curve_queries,
            base_eval=args.base_eval, k=args.k,
            seed=args.seed, threads=args.threads,
            progress=not args.quiet, overwrite=args.overwrite)
        config.check()
        entries = read_catalog(args.catalog, args.id_column, args.text_column, args.catalog_format)
        pairs = read_pairs(args.train, args.format, args.query_template or DEFAULT_QUERY_TEMPLATE)
        report = train_reranker(pairs, entries, config, Path(args.train), args.format,
                                instruction=args.instruction)
    except ValidationError as exc:
        print(f"rankd train-reranker: {describe(exc, 'RANKD_RERANKER_')}", file=sys.stderr)
        return 2
    except SettingsError as exc:
        print(f"rankd train-reranker: {exc}", file=sys.stderr)
        return 2
    except (RerankerTrainingError, TrainingError, RerankerConfigError, CatalogError,
            EmbedderLoadError, BackendError, OSError) as exc:
        print(f"rankd train-reranker: {exc}", file=sys.stderr)
        return 2
    summary = {key: report[key] for key in ("output", "reported_file", "scoring", "precision",
                                            "retriever", "examples", "retrieval_only",
                                            "ceiling", "fusion", "base", "fine_tuned",
                                            "seconds", "peak_rss_mib")}
    summary["fusion"] = {k: v for k, v in summary["fusion"].items() if k != "table"}
    print(json.dumps(summary, indent=2))
    return 0


def register_train(sub: argparse._SubParsersAction) -> None:
    """Add `rankd train-reranker`."""
    from reranker.training import CandidateOrder, ExampleOrders, RerankerTrainingConfig
    from retriever.cli import add_training_data_options

    defaults = RerankerTrainingConfig(output_dir=Path("."))
    train = sub.add_parser(
        "train-reranker",
        help="fine-tune the LLM reranker on labelled (query, catalogue id) pairs",
        description="Fine-tuning on the serving prompts over the retriever's top-N candidates: "
                    "listwise (cross-entropy over the N label logits at the answer position, in "
                    "retrieval order and reversed) or pointwise (each candidate's yes/no score, "
                    "cross-entropy of the positive among the query's candidates). --output "
                    "becomes a model directory for RANKD_RERANKER_MODEL, vLLM and `rankd "
                    "quantize`; it also holds checkpoints/, validation.* (for `rankd batch` and "
                    "`rankd eval`), rankd_reranker.json (the prompt settings and the fusion chosen "
                    "on validation, which `rankd serve` reads) and training_report.json. The "
                    "templates, instruction, labels and chat template are the service's "
                    "(RANKD_RERANKER_*), and so are the embedder's runtime settings "
                    "(RANKD_EMBEDDER_*).")
    data = add_training_data_options(train)
    data.add_argument("--instruction", help="the rerank instruction; give the collection's "
                                            "(rankd index build --instruction) if it has one "
                                            "(default: $RANKD_RERANKER_INSTRUCTION or rankd's)")

    candidates = train.add_argument_group("candidates and prompts")
    candidates.add_argument("--retriever", help="embedder that retrieves the candidates: the "
                                                "default, or a `rankd train-retriever` output "
                                                "(default: $RANKD_EMBEDDER_MODEL)")
    candidates.add_argument("--fold-retrievers", nargs="+", metavar="DIR",
                            help="cross-fitting: one `rankd train-retriever --folds K --fold I` "
                                 "output per fold; each training pair's candidates come from "
                                 "the retriever that left its question out, as served queries' "
                                 "do (validation's from --retriever)")
    candidates.add_argument("--scoring", choices=["listwise", "pointwise"],
                            help="the scoring mode to train, and to serve with (default: "
                                 "$RANKD_RERANKER_SCORING when set, else pointwise, the recipe)")
    candidates.add_argument("--candidates", type=int, default=defaults.candidates,
                            help="N, candidates per example (the most, with --min-candidates)")
    candidates.add_argument("--min-candidates", type=int, default=defaults.min_candidates,
                            help="draw each example's N from [this, --candidates] (0: a fixed N)")
    candidates.add_argument("--candidate-order", choices=[o.value for o in CandidateOrder],
                            default=defaults.candidate_order.value,
                            help="listwise: the candidates in retrieval order, as served, or "
                                 "in a seeded random order")
    candidates.add_argument("--missing-positive", choices=["insert", "skip"],
                            default=defaults.missing_positive.value,
                            help="when the positive is not in the top N: put it in the last "
                                 "candidate's place, or leave the query out")
    candidates.add_argument("--random-negatives", type=int, default=defaults.random_negatives,
                            metavar="R",
                            help="replace the last R retrieved negatives of each example with "
                                 "catalogue entries drawn at random (seeded); 0: the retriever's "
                                 "head alone, as served")
    candidates.add_argument("--example-orders", choices=[o.value for o in ExampleOrders],
                            default=defaults.example_orders.value,
                            help="listwise: each example in its order and reversed (both, as "
                                 "served), in its order only, or in one of the two, taking turns "
                                 "(alternate: half the prompts)")
    candidates.add_argument("--max-tokens", type=int, default=defaults.max_tokens,
                            help="prompts longer than this are left out (and counted)")
    candidates.add_argument("--examples", type=int, default=defaults.examples,
                            help="training pairs drawn from the training split (seeded; 0: all)")

    model = train.add_argument_group("model and training")
    model.add_argument("--model", help="base reranker (default: $RANKD_RERANKER_MODEL or the "
                                       "embedded SmolLM2-135M-Instruct)")
    model.add_argument("--device", default="auto",
                       help="auto (CUDA when present), cpu, cuda, cuda:N; training runs in "
                            "bfloat16 autocast where serving would choose bfloat16 "
                            "(RANKD_RERANKER_DTYPE, auto: a GPU with bf16, a CPU with AMX-BF16 "
                            "or AVX512-BF16)")
    model.add_argument("--method", choices=["lora", "full"], default=defaults.method.value)
    model.add_argument("--lora-rank", type=int, default=defaults.lora_rank)
    model.add_argument("--lora-alpha", type=int, default=defaults.lora_alpha)
    model.add_argument("--lora-layers", type=int, default=defaults.lora_layers,
                       help="LoRA on the last N decoder layers only (0: all)")
    model.add_argument("--train-layers", type=int, default=defaults.train_layers,
                       help="full fine-tuning of the last N decoder layers and the final norm "
                            "only; no gradient flows below them (0: every weight)")
    model.add_argument("--epochs", type=float, default=defaults.epochs)
    model.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    model.add_argument("--warmup", type=float, default=defaults.warmup_ratio,
                       help="warm-up as a fraction of all steps")
    model.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="examples per forward pass (a listwise example holds one prompt "
                            "per order it is shown in, a pointwise one N prompts)")
    model.add_argument("--gradient-accumulation", type=int,
                       default=defaults.gradient_accumulation,
                       help="forward passes per optimizer step")
    model.add_argument("--threads", type=int, default=defaults.threads,
                       help="torch threads (0: torch's choice)")
    model.add_argument("--seed", type=int, default=defaults.seed)

    validation = train.add_argument_group("validation")
    validation.add_argument("--validation-fraction", type=float,
                            default=defaults.validation_fraction,
                            help="share of the questions (groups) held out to choose on (the "
                                 "fusion); never split by row")
    validation.add_argument("--test-fraction", type=float, default=defaults.test_fraction,
                            help="share of the questions no choice sees, reported (test.csv); "
                                 "as train-retriever's. 0: report validation questions instead")
    validation.add_argument("--fusion-queries", type=int, default=defaults.fusion_queries,
                            help="validation queries (whole questions) the fusion method and "
                                 "weight are chosen on and written to rankd_reranker.json; "
                                 "never reported (0: all of validation with a test split, "
                                 "else half)")
    validation.add_argument("--eval-queries", type=int, default=defaults.eval_queries,
                            help="queries reported, whole questions (0: all of them)")
    validation.add_argument("--curve-points", type=int, default=defaults.curve_points,
                            help="evaluations during training, for the learning curve")
    validation.add_argument("--curve-queries", type=int, default=defaults.curve_queries,
                            help="validation queries of those evaluations (0: --eval-queries')")
    validation.add_argument("--base-eval", action=argparse.BooleanOptionalAction,
                            default=defaults.base_eval,
                            help="evaluate the model before training, the curve's first point "
                                 "(--no-base-eval: runs comparing options take it from one)")
    validation.add_argument("-k", type=int, default=defaults.k, help="MAP@k")
    validation.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train_reranker)
