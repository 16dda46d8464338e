"""Where rankd keeps what it converts and exports, how a directory it builds appears there, and
which torch device "auto" means: one answer each for every stage."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
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


@contextlib.contextmanager
def staged_directory(target: Path, replace: bool = False,
                     finished: Callable[[Path], bool] = Path.is_dir) -> Iterator[Path]:
    """A new hidden directory beside ``target`` to build it in. On a clean exit it takes
    ``target``'s name in one rename, so neither a crash nor a concurrent build ever leaves a
    half-built ``target``; it is removed on the way out either way.

    Where another process finished ``target`` first (``finished``), that one is kept: a model
    converted or unpacked from the same source is as good as ours. ``replace`` removes an
    existing ``target`` first instead (a command's ``--overwrite``)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        yield staging
        if replace and target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not finished(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
