"""Registers retriever subcommands (train-retriever) on the ``rankd`` parser."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Retriever training subcommands are added here by the train-retriever issue."""
