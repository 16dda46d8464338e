"""Registers ``rankd serve`` on the ``rankd`` parser."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

async def serve(settings: Any, sample: bool = False) -> int:
    """Start the engine, then serve it; "serving on" is printed once start-up has finished."""
    import uvicorn

    from reranker.errors import RerankerConfigError
    from retriever.embedder import EmbedderLoadError
    from retriever.vocabulary import IndexIntegrityError
    from service.app import create_app
    from service.engine import Engine
    from service.server import server_config

    if sample:
        from retriever.sample import ensure_sample_collection

        await asyncio.to_thread(ensure_sample_collection, settings.index_dir,
                                settings.embedder_model, settings.embedder_variant,
                                settings.embedder_cache_dir)
    try:
        engine = await Engine.start(settings)
    except (RerankerConfigError, EmbedderLoadError, IndexIntegrityError) as exc:
        # A start-up refusal the operator fixes: one line that says what, no traceback.
        print(f"rankd serve: {exc}", file=sys.stderr)
        return 2
    url = f"http://{settings.host}:{settings.port}"
    example = json.dumps({"query": "Calculate 1/2 + 1/3. Incorrect answer: 2/5", "top_k": 5})

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            if self.started:
                print(f"rankd serving on {url}\n  try: curl -s {url}/rank -H "
                      f"'Content-Type: application/json' -d '{example}'", flush=True)

    server = Server(server_config(create_app(settings, engine), settings,
                                  timeout_graceful_shutdown=30))
    try:
        await server.serve()
    finally:
        await engine.close()
    return 0 if server.started else 1


def _serve(args: argparse.Namespace) -> int:
    from runtime.logs import configure_logging
    from runtime.settings import SettingsError
    from service.settings import load_settings

    overrides = {k: v for k, v in {"host": args.host, "port": args.port,
                                   "index_dir": args.index_dir}.items() if v is not None}
    try:
        settings = load_settings(**overrides)
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    return asyncio.run(serve(settings, sample=args.sample))


def register(sub: argparse._SubParsersAction) -> None:
    serve_parser = sub.add_parser("serve",
                                  help="run the HTTP service (settings from RANKD_* variables)")
    serve_parser.add_argument("--host", help="overrides RANKD_HOST")
    serve_parser.add_argument("--port", type=int, help="overrides RANKD_PORT")
    serve_parser.add_argument("--index-dir", type=Path, help="overrides RANKD_INDEX_DIR")
    serve_parser.add_argument("--sample", action="store_true",
                              help="build the embedded sample catalogue into the index dir if "
                                   "missing")
    serve_parser.set_defaults(handler=_serve)
