"""Registers the client subcommands (batch, eval, loadtest) on the ``rankd`` parser."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Client subcommands are added here by the clients issue."""
