"""The ``rankd`` command line. Each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from clients.cli import register as register_client_commands
from reranker.cli import register as register_reranker_commands
from retriever.cli import register as register_retriever_commands

Handler = Callable[[argparse.Namespace], int]


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------- index build


def _index_build(args: argparse.Namespace) -> int:
    from retriever import Embedder, IndexKind, build_collection, read_catalog
    from retriever.catalog import CatalogError
    from retriever.embedder import EmbedderLoadError

    index_dir = Path(args.index_dir or os.environ.get("RANKD_INDEX_DIR", "./rankd-index"))
    model = args.model or os.environ.get("RANKD_EMBEDDER_MODEL", "sentence-transformers/all-MiniLM-L6-v2")
    started = time.perf_counter()
    try:
        entries = read_catalog(args.catalog, args.id_column, args.text_column, args.format)
        embedder = Embedder.load(model, args.device, args.batch_size)
    except (CatalogError, EmbedderLoadError) as exc:
        print(f"rankd index build: {exc}", file=sys.stderr)
        return 2
    path = build_collection(entries, embedder, index_dir, args.collection,
                            instruction=args.instruction, kind=IndexKind(args.index_type),
                            show_progress=not args.quiet)
    elapsed = time.perf_counter() - started
    size = sum(f.stat().st_size for f in path.iterdir())
    print(json.dumps({"collection": args.collection, "path": str(path), "count": len(entries),
                      "embedder": embedder.name, "dimension": embedder.dimension,
                      "index_type": args.index_type, "seconds": round(elapsed, 2),
                      "bytes": size}))
    return 0


def _add_index(sub: argparse._SubParsersAction) -> None:
    index = sub.add_parser("index", help="build and inspect collection indexes")
    index_sub = index.add_subparsers(dest="index_command", required=True)
    build = index_sub.add_parser("build", help="embed a catalogue into a FAISS collection")
    build.add_argument("--catalog", required=True, help="CSV, JSONL or Parquet file")
    build.add_argument("--id-column", required=True)
    build.add_argument("--text-column", required=True)
    build.add_argument("--collection", required=True, help="collection name")
    build.add_argument("--index-dir", help="default: $RANKD_INDEX_DIR or ./rankd-index")
    build.add_argument("--model", help="embedder: hub id or directory (default: $RANKD_EMBEDDER_MODEL or all-MiniLM-L6-v2)")
    build.add_argument("--instruction", help="the collection's rerank instruction, kept in its manifest")
    build.add_argument("--format", choices=["csv", "jsonl", "parquet"], help="default: from the file suffix")
    build.add_argument("--index-type", choices=["flat", "hnsw", "ivf"], default="flat",
                       help="flat is exact; hnsw/ivf are approximate, for large catalogues")
    build.add_argument("--device", default="auto")
    build.add_argument("--batch-size", type=int, default=64)
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(handler=_index_build)


# ---------------------------------------------------------------- serve


def ensure_sample_index(index_dir: Path, model: str) -> None:
    """Build the embedded sample collection when it is missing."""
    from retriever import Embedder
    from retriever.data import SAMPLE_COLLECTION, build_sample_collection

    if (index_dir / SAMPLE_COLLECTION / "manifest.json").is_file():
        return
    print(f"building the sample collection {SAMPLE_COLLECTION!r} in {index_dir} ...", flush=True)
    build_sample_collection(Embedder.load(model), index_dir)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.settings import SettingsError, load_settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "index_dir": args.index_dir}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    _configure_logging(settings.log_level)
    if args.sample:
        ensure_sample_index(Path(settings.index_dir), settings.embedder_model)
    url = f"http://{settings.host}:{settings.port}"
    example = json.dumps({"query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "top_k": 5})
    print(f"rankd serving on {url}\n  try: curl -s {url}/rank -H 'Content-Type: application/json' "
          f"-d '{example}'", flush=True)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port,
                log_level=settings.log_level, timeout_graceful_shutdown=30)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="run the HTTP service (settings from RANKD_* variables)")
    serve.add_argument("--host", help="overrides RANKD_HOST")
    serve.add_argument("--port", type=int, help="overrides RANKD_PORT")
    serve.add_argument("--index-dir", help="overrides RANKD_INDEX_DIR")
    serve.add_argument("--sample", action="store_true",
                       help="build the embedded sample catalogue into the index dir if missing")
    serve.set_defaults(handler=_serve)


# ---------------------------------------------------------------- main

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_serve,
    _add_index,
    register_retriever_commands,
    register_reranker_commands,
    register_client_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankd", description="Two-stage retrieve-and-rerank service")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "serve":  # serve configures logging from its validated settings
        _configure_logging(os.environ.get("RANKD_LOG_LEVEL", "info"))
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
