"""Registers reranker subcommands (quantize) on the ``rankd`` parser."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`rankd quantize` is added here by the deployment issue."""
