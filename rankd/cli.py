"""The ``rankd`` command line: the composition root. Each package registers its own
subcommands, and each subcommand imports what it needs only when it runs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from clients.cli import register as register_client_commands
from rankd.pipeline import register as register_pipeline_commands
from reranker.cli import register as register_reranker_commands
from retriever.cli import register as register_retriever_commands
from runtime.logs import configure_logging
from runtime.settings import SettingsError
from service.cli import register as register_service_commands

Handler = Callable[[argparse.Namespace], int]

REGISTRARS: list[Callable[[argparse._SubParsersAction], None]] = [
    register_service_commands,
    register_retriever_commands,
    register_reranker_commands,
    register_client_commands,
    register_pipeline_commands,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rankd",
                                     description="Two-stage retrieve-and-rerank service")
    sub = parser.add_subparsers(dest="command", required=True)
    for register in REGISTRARS:
        register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed, for reports
    if args.command != "serve":  # serve configures logging from its own settings
        try:
            configure_logging()
        except SettingsError as exc:
            print(exc, file=sys.stderr)
            return 2
    handler: Handler = args.handler
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
