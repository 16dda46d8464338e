"""A trained pipeline's directory, as `rankd train-pipeline` writes it and `rankd serve` reads it
(``RANKD_PIPELINE_DIR``): the fine-tuned embedder, the index it built and the reranker trained
on its candidates, tied together by ``rankd_pipeline.json``.

    DIR/retriever/   `rankd train-retriever` output (the embedder)
    DIR/index/       `rankd index build --model DIR/retriever` output (one collection)
    DIR/reranker/    `rankd train-reranker --retriever DIR/retriever` output
    DIR/rankd_pipeline.json
    DIR/reranker-w4a16/  optional: `rankd quantize --model DIR/reranker --output ...`, for vLLM
                     (RANKD_RERANKER_MODEL may name such a copy inside the directory)

The manifest names the stages by paths relative to the directory, so the directory can move
(into a container's volume): the index records its embedder's weights digest, which still
matches there (retriever.index.load_collection).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reranker.trained import SERVING_FILE

PIPELINE_FILE = "rankd_pipeline.json"
STAGE_DIRS = {"retriever": "retriever", "index": "index", "reranker": "reranker"}


class PipelineError(ValueError):
    """The pipeline directory cannot be served; the message says what to do."""


@dataclass(frozen=True)
class PipelineLayout:
    directory: Path
    embedder: Path
    index_dir: Path
    reranker: Path
    manifest: dict[str, Any]

    def quantized_reranker(self, model: str) -> bool:
        """Whether ``model`` is a directory inside the pipeline holding a `rankd quantize`
        output: its reranker 4-bit, for vLLM, which carries the same serving settings."""
        path = Path(model).expanduser().resolve()
        if not path.is_relative_to(self.directory) or not (path / SERVING_FILE).is_file():
            return False
        try:
            carried = json.loads((path / SERVING_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(carried, dict) and "quantized" in carried


def read_pipeline(directory: Path) -> PipelineLayout:
    """The stages of a complete pipeline directory, checked to be there."""
    path = directory.expanduser() / PIPELINE_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"RANKD_PIPELINE_DIR={directory} holds no {PIPELINE_FILE}; point it "
                            "at a `rankd train-pipeline --output` directory") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{path} cannot be read ({exc}); train the pipeline again") from None
    if not isinstance(manifest, dict) or manifest.get("status") != "complete":
        status = manifest.get("status") if isinstance(manifest, dict) else None
        raise PipelineError(f"{path} says the pipeline is not complete (status {status!r}); "
                            "finish it with `rankd train-pipeline` (--overwrite) first")
    root = path.parent.resolve()
    stages = {name: root / str((manifest.get("stages") or {}).get(name, {}).get("dir", default))
              for name, default in STAGE_DIRS.items()}
    for name, stage in stages.items():
        if not stage.is_dir():
            raise PipelineError(f"{path} names the {name} at {stage}, which is not a directory; "
                                "the pipeline directory is incomplete")
    return PipelineLayout(root, stages["retriever"], stages["index"], stages["reranker"],
                          manifest)
