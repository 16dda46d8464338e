"""Where rankd keeps what it converts and exports, and which torch device "auto" means: one
answer each for every stage."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/rankd``, else ``~/.cache/rankd``: converted models, exported embedders."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rankd"


def select_device(requested: str) -> str:
    """``requested``, with "auto" made the GPU when there is one, else the CPU."""
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
