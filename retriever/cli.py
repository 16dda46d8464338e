"""Registers the retriever's subcommands on the ``rankd`` parser: ``index build`` and
``train-retriever``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from retriever.config import RetrieverSettings

# Light: no torch, transformers or datasets until a training run starts.
from retriever.training import TrainingConfig
from runtime.settings import SettingsError, read_settings


def _index_build(args: argparse.Namespace) -> int:
    from retriever import (
        Embedder,
        IndexKind,
        IndexSpec,
        StoreKind,
        StoreTarget,
        build_collection,
        read_catalog,
    )
    from retriever.catalog import CatalogError
    from retriever.embedder import EmbedderLoadError
    from retriever.encoders import EmbedderBackend, EmbedderQuantization, EmbedderVariant
    from retriever.hygiene import CleaningSpec, DedupMode, KeepRule, clean_catalog
    from retriever.vocabulary import IndexIntegrityError

    try:
        settings = read_settings(RetrieverSettings)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    index_dir = Path(args.index_dir or settings.index_dir)
    model = args.model or settings.embedder_model
    backend = StoreKind(args.backend)
    uri = args.milvus_uri or settings.milvus_uri
    if backend is StoreKind.MILVUS and not uri:
        print("rankd index build: --backend milvus needs --milvus-uri (a Milvus Lite file such as "
              "./milvus.db, or http://host:19530) or RANKD_MILVUS_URI", file=sys.stderr)
        return 2
    spec = IndexSpec(kind=IndexKind(args.index_type), hnsw_m=args.hnsw_m,
                     ef_construction=args.ef_construction, ef_search=args.ef,
                     ivf_lists=args.ivf_lists, nprobe=args.nprobe)
    started = time.perf_counter()
    report = None
    try:
        cleaning = CleaningSpec(dedup=DedupMode(args.dedup), near_threshold=args.near_threshold,
                                keep=KeepRule(args.keep), filter_noise=args.filter_noise,
                                min_chars=args.min_chars, max_chars=args.max_chars)
        entries = read_catalog(args.catalog, args.id_column, args.text_column, args.format,
                               allow_empty=cleaning.filter_noise)
        variant = EmbedderVariant(
            EmbedderBackend(args.embedder_backend or settings.embedder_backend),
            EmbedderQuantization(args.embedder_quantization or settings.embedder_quantization))
        embedder = Embedder.load(model, args.device or settings.embedder_device,
                                 args.batch_size, variant)
        vectors, aliases, recorded = None, None, None
        if cleaning.active:
            cleaned = clean_catalog(entries, cleaning,
                                    lambda texts: embedder.encode(texts, not args.quiet))
            entries, vectors, aliases = cleaned.entries, cleaned.vectors, cleaned.aliases
            report = cleaned.report
            recorded = {**cleaning.settings(), **report.counts()}
            print(f"rankd index build: {report.summary()}", file=sys.stderr)
            if not entries:
                raise CatalogError("cleaning left no entries; loosen --min-chars/--max-chars")
        path = build_collection(entries, embedder, index_dir, args.collection,
                                instruction=args.instruction, spec=spec, backend=backend,
                                target=StoreTarget(uri, settings.store_target.token),
                                show_progress=not args.quiet, vectors=vectors,
                                cleaning=recorded, aliases=aliases)
    except (CatalogError, EmbedderLoadError, IndexIntegrityError, ValueError) as exc:
        print(f"rankd index build: {exc}", file=sys.stderr)
        return 2
    if args.report is not None:
        Path(args.report).write_text(json.dumps(
            report.as_dict() if report else {"settings": cleaning.settings()}, indent=2,
            ensure_ascii=False) + "\n", encoding="utf-8")
    elapsed = time.perf_counter() - started
    size = sum(f.stat().st_size for f in path.iterdir())
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    print(json.dumps({"collection": args.collection, "path": str(path), "count": len(entries),
                      "embedder": embedder.name, "embedder_variant": str(embedder.variant),
                      "dimension": embedder.dimension,
                      "backend": backend.value, "index_type": args.index_type,
                      "search_params": manifest["search_params"],
                      "location": manifest["location"], "cleaning": manifest["cleaning"],
                      "seconds": round(elapsed, 2),
                      "bytes": size}))
    return 0


def register_index(sub: argparse._SubParsersAction) -> None:
    from retriever.vocabulary import IndexSpec

    defaults = IndexSpec()
    index = sub.add_parser("index", help="build collection indexes")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="embed a catalogue into a collection (FAISS files "
                                               "or Milvus)")
    build.add_argument("--catalog", required=True, help="CSV, JSONL or Parquet file")
    build.add_argument("--id-column", required=True)
    build.add_argument("--text-column", required=True)
    build.add_argument("--collection", required=True, help="collection name")
    build.add_argument("--index-dir", help="where the manifest goes (and, for faiss, the index): "
                                           "default $RANKD_INDEX_DIR or ./rankd-index")
    build.add_argument("--model", help="embedder: hub id or directory (default: $RANKD_EMBEDDER_MODEL or all-MiniLM-L6-v2)")
    build.add_argument("--instruction", help="the collection's rerank instruction, kept in its manifest")
    build.add_argument("--format", choices=["csv", "jsonl", "parquet"], help="default: from the file suffix")
    build.add_argument("--backend", choices=["faiss", "milvus"], default="faiss",
                       help="faiss: files in the index dir, searched in process; milvus: a Milvus "
                            "collection (Lite file or server, --milvus-uri)")
    build.add_argument("--milvus-uri", help="Milvus Lite file (./milvus.db) or server "
                                            "(http://host:19530); default $RANKD_MILVUS_URI")
    build.add_argument("--index-type", choices=["flat", "hnsw", "ivf"], default="flat",
                       help="flat is exact; hnsw/ivf are approximate, for large catalogues")
    build.add_argument("--hnsw-m", type=int, default=defaults.hnsw_m, help="HNSW: links per node")
    build.add_argument("--ef-construction", type=int, default=defaults.ef_construction,
                       help="HNSW build breadth (Milvus; FAISS uses its own)")
    build.add_argument("--ef", type=int, default=defaults.ef_search,
                       help="HNSW search breadth, recorded in the manifest")
    build.add_argument("--ivf-lists", type=int, default=None,
                       help="IVF: number of lists (default about 4*sqrt(count))")
    build.add_argument("--nprobe", type=int, default=defaults.nprobe,
                       help="IVF: lists searched per query, recorded in the manifest")
    build.add_argument("--device", help="default: $RANKD_EMBEDDER_DEVICE or auto")
    build.add_argument("--embedder-backend", choices=["torch", "onnx", "openvino"],
                       help="the embedder's runtime, recorded in the manifest; serve with the "
                            "same (default $RANKD_EMBEDDER_BACKEND or torch)")
    build.add_argument("--embedder-quantization", choices=["none", "int8"],
                       help="int8 with --embedder-backend onnx or openvino "
                            "(default $RANKD_EMBEDDER_QUANTIZATION or none)")
    build.add_argument("--batch-size", type=int, default=64)
    hygiene = build.add_argument_group(
        "catalogue hygiene", "off by default: the build indexes every entry as given")
    hygiene.add_argument("--dedup", choices=["off", "exact", "near"], default="off",
                         help="merge duplicates: exact (same text after NFKC, case folding and "
                              "whitespace collapse) or near (and cosine >= --near-threshold); "
                              "the merged ids become the kept entry's aliases")
    hygiene.add_argument("--near-threshold", type=float, default=0.95,
                         help="cosine similarity at which near duplicates merge (default 0.95)")
    hygiene.add_argument("--keep", choices=["first", "longest"], default="first",
                         help="which entry of a duplicate group is kept: the first in the "
                              "catalogue, or the longest text (default first)")
    hygiene.add_argument("--filter-noise", action="store_true",
                         help="drop entries that are empty, only markup, or only digits")
    hygiene.add_argument("--min-chars", type=int, default=0,
                         help="drop entries shorter than this (default 0: none)")
    hygiene.add_argument("--max-chars", type=int, default=0,
                         help="drop entries longer than this (default 0: none)")
    hygiene.add_argument("--report", help="write the cleaning report (JSON) here: the counts "
                                          "per rule and the largest duplicate groups")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(handler=_index_build)


def _train_retriever(args: argparse.Namespace) -> int:
    from retriever.catalog import CatalogError, read_catalog
    from retriever.eedi import DEFAULT_QUERY_TEMPLATE
    from retriever.embedder import EmbedderLoadError
    from retriever.pairs import TrainingError, read_pairs, write_validation_file
    from retriever.training import (
        LossKind,
        NegativeSampling,
        SamplerKind,
        parse_window,
        train_retriever,
    )

    try:
        config = TrainingConfig(
            output_dir=Path(args.output),
            model=args.model or read_settings(RetrieverSettings).embedder_model,
            device=args.device,
            epochs=args.epochs,
            learning_rate=args.lr,
            warmup_ratio=args.warmup,
            batch_size=args.batch_size,
            seed=args.seed,
            sampler=SamplerKind(args.batch_sampler),
            loss=LossKind(args.loss),
            mini_batch_size=args.mini_batch_size,
            negatives=args.negatives,
            negative_window=parse_window(args.negative_window),
            negative_sampling=NegativeSampling(args.negative_sampling),
            validation_fraction=args.validation_fraction,
            test_fraction=args.test_fraction,
            train_fraction=args.train_fraction,
            negative_model=args.mine_with,
            holdout_fraction=args.holdout_misconceptions,
            folds=args.folds,
            fold=args.fold,
            k=args.k,
            eval_batch_size=args.eval_batch_size,
            progress=not args.quiet,
            overwrite=args.overwrite,
        )
        config.check()
        entries = read_catalog(args.catalog, args.id_column, args.text_column, args.catalog_format)
        pairs = read_pairs(args.train, args.format,
                           args.query_template or DEFAULT_QUERY_TEMPLATE)
        report = train_retriever(pairs, entries, config)
        validation_file = write_validation_file(args.train, args.format,
                                                set(report["validation_groups"]), args.output)
        test_file = (write_validation_file(args.train, args.format, set(report["test_groups"]),
                                           args.output, "test")
                     if report["test_groups"] else None)
    except (TrainingError, CatalogError, EmbedderLoadError, OSError, SettingsError) as exc:
        print(f"rankd train-retriever: {exc}", file=sys.stderr)
        return 2
    summary = {key: report[key] for key in ("output", "pairs", "validation_queries", "zero_shot",
                                            "fine_tuned", "best_checkpoint", "seconds",
                                            "peak_rss_mib")}
    summary["validation_file"] = str(validation_file)
    summary["test_file"] = str(test_file) if test_file else None
    print(json.dumps(summary, indent=2))
    return 0


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    register_index(sub)
    register_train(sub)


def add_training_data_options(train: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The labelled pairs, the catalogue and the output of a training command (`rankd
    train-retriever`, `rankd train-reranker`): one set of options for both."""
    data = train.add_argument_group("data")
    data.add_argument("--train", required=True, help="labelled pairs file")
    data.add_argument("--format", required=True, choices=["eedi", "jsonl"],
                      help="eedi: the competition's train.csv; jsonl: {query, positive_id} per line "
                           "(optional group, id)")
    data.add_argument("--catalog", required=True, help="catalogue file (CSV, JSONL or Parquet)")
    data.add_argument("--id-column", default="MisconceptionId")
    data.add_argument("--text-column", default="MisconceptionName")
    data.add_argument("--catalog-format", choices=["csv", "jsonl", "parquet"],
                      help="default: from the catalogue's suffix")
    data.add_argument("--query-template", default=None,
                      help="eedi query template (default: the batch client's, retriever/eedi.py)")
    data.add_argument("--output", required=True, help="directory for the fine-tuned model")
    data.add_argument("--overwrite", action="store_true",
                      help="replace an earlier training run in --output")
    return data


def register_train(sub: argparse._SubParsersAction) -> None:
    defaults = TrainingConfig(output_dir=Path("."))
    train = sub.add_parser(
        "train-retriever",
        help="fine-tune the embedder on labelled (query, catalogue id) pairs",
        description="Contrastive fine-tuning (MultipleNegativesRankingLoss with mined hard "
                    "negatives). --output becomes a model directory for `rankd index build "
                    "--model DIR`; it also holds checkpoints/ and training_report.json.",
    )
    add_training_data_options(train)

    model = train.add_argument_group("model and training")
    model.add_argument("--model", help="base embedder (default: $RANKD_EMBEDDER_MODEL or "
                                       "all-MiniLM-L6-v2 from the package)")
    model.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    model.add_argument("--epochs", type=float, default=defaults.epochs)
    model.add_argument("--lr", type=float, default=defaults.learning_rate, help="peak learning rate")
    model.add_argument("--warmup", type=_fraction, default=defaults.warmup_ratio,
                       help="warm-up as a fraction of all steps")
    model.add_argument("--batch-size", type=int, default=defaults.batch_size,
                       help="pairs per batch; each query's in-batch negatives are the others")
    model.add_argument("--seed", type=int, default=defaults.seed)
    model.add_argument("--batch-sampler", choices=["length-grouped", "no-duplicates"],
                       default=defaults.sampler.value,
                       help="both keep a text out of a batch twice; length-grouped also batches "
                            "queries of similar length, which pads less")
    model.add_argument("--loss", choices=["mnrl", "cached"], default=defaults.loss.value,
                       help="cached: CachedMultipleNegativesRankingLoss, big batches in little memory")
    model.add_argument("--mini-batch-size", type=int, default=defaults.mini_batch_size,
                       help="forward chunk of the cached loss")

    mining = train.add_argument_group("hard negatives (mined with the base model)")
    mining.add_argument("--negatives", type=int, default=defaults.negatives,
                        help="hard negatives per query")
    mining.add_argument("--negative-window", default="{}-{}".format(*defaults.negative_window),
                        help="base-model ranks to take them from, FIRST-LAST (1-based, inclusive)")
    mining.add_argument("--negative-sampling", choices=["top", "random"],
                        default=defaults.negative_sampling.value,
                        help="the best-ranked eligible entries of the window, or a seeded random draw")
    mining.add_argument("--mine-with", metavar="MODEL", default=defaults.negative_model,
                        help="mine the negatives with this embedder instead of the base model "
                             "(a second round: an earlier fine-tuned run's own mistakes)")

    validation = train.add_argument_group("validation")
    validation.add_argument("--validation-fraction", type=_fraction,
                            default=defaults.validation_fraction,
                            help="share of questions (groups, never rows) held for validation")
    validation.add_argument("--test-fraction", type=_fraction, default=defaults.test_fraction,
                            help="share of questions kept from training and from every choice "
                                 "(written to test.csv, for the final report; never scored here)")
    validation.add_argument("--train-fraction", type=float, default=defaults.train_fraction,
                            help="train on this share of the training questions (a learning "
                                 "curve's point)")
    validation.add_argument("--holdout-misconceptions", type=_fraction,
                            default=defaults.holdout_fraction,
                            metavar="FRACTION",
                            help="withhold this share of the positive ids from training entirely")
    validation.add_argument("--k", type=int, default=defaults.k, help="cut-off of MAP@k and recall@k")
    validation.add_argument("--eval-batch-size", type=int, default=defaults.eval_batch_size)

    cross_fit = train.add_argument_group(
        "cross-fitting (the retrievers of `rankd train-reranker --fold-retrievers`)")
    cross_fit.add_argument("--folds", type=int, default=defaults.folds,
                           help="split the training questions into this many folds by a seeded "
                                "hash (0: no cross-fitting)")
    cross_fit.add_argument("--fold", type=int, default=defaults.fold,
                           help="the fold left out of training, 0 to --folds - 1")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train_retriever)
