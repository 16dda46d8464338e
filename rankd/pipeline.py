"""`rankd train-pipeline`: from labelled pairs to a served two-stage pipeline, in one directory.

It runs the three stage commands in order, each with its own defaults, into one directory
(service/pipeline.py has the layout): `rankd train-retriever`, `rankd index build` with the
fine-tuned embedder, and `rankd train-reranker` on that retriever's candidates. Both trainers
get the same split (seed, validation and test fractions), so the reranker is reported on the
questions neither stage trained or chose on. ``rankd_pipeline.json`` says which embedder built
which index, which reranker, its settings and both stages' figures, and is rewritten after
each stage, so a run that stops keeps what it paid for; `RANKD_PIPELINE_DIR=DIR rankd serve`
serves it. Each stage's own command stays for whoever needs its other options
(``--retriever-args``, ``--reranker-args`` pass them through).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.pipeline import PIPELINE_FILE, STAGE_DIRS


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _figures(output: Path) -> dict[str, Any]:
    """Both stages' figures, from their own reports."""
    retriever = _read(output / STAGE_DIRS["retriever"] / "training_report.json")
    reranker = _read(output / STAGE_DIRS["reranker"] / "training_report.json")
    figures: dict[str, Any] = {}
    if retriever.get("fine_tuned"):
        figures["retriever"] = {"zero_shot": retriever.get("zero_shot"),
                                "fine_tuned": retriever["fine_tuned"],
                                "measured_on": "validation (which chose the checkpoint)"}
    if reranker.get("fine_tuned"):
        fine_tuned = reranker["fine_tuned"]
        figures["reranker"] = {
            "measured_on": reranker.get("reported_on"),
            "retrieval_only": reranker.get("retrieval_only"),
            "reranker_alone": fine_tuned.get("none"), "served": fine_tuned.get("served"),
            "gain": fine_tuned.get("gain"),
            "carried_gain_on_validation": (reranker.get("fusion") or {}).get("carried")}
    return figures


def _manifest(output: Path, status: str, argv: list[str], seconds: dict[str, float],
              ) -> dict[str, Any]:
    index = output / STAGE_DIRS["index"]
    collections = sorted(p.name for p in index.iterdir() if p.is_dir()) if index.is_dir() else []
    built = _read(index / collections[0] / "manifest.json") if collections else {}
    return {
        "status": status,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(["rankd", *argv]),
        "stages": {
            "retriever": {"dir": STAGE_DIRS["retriever"]},
            "index": {"dir": STAGE_DIRS["index"], "collections": collections,
                      "embedder": built.get("embedder"),
                      "embedder_sha256": built.get("embedder_sha256")},
            "reranker": {"dir": STAGE_DIRS["reranker"],
                         "settings": _read(output / STAGE_DIRS["reranker"]
                                           / "rankd_reranker.json")},
        },
        "figures": _figures(output),
        "seconds": seconds,
    }


def _write(output: Path, manifest: dict[str, Any]) -> None:
    (output / PIPELINE_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _stage_commands(args: argparse.Namespace, output: Path) -> list[tuple[str, list[str]]]:
    data = ["--train", args.train, "--format", args.format, "--catalog", args.catalog,
            "--id-column", args.id_column, "--text-column", args.text_column]
    if args.catalog_format:
        data += ["--catalog-format", args.catalog_format]
    if args.query_template:
        data += ["--query-template", args.query_template]
    split = ["--seed", str(args.seed), "--validation-fraction", str(args.validation_fraction),
             "--test-fraction", str(args.test_fraction)]
    quiet = ["--quiet"] if args.quiet else []
    retriever = str(output / STAGE_DIRS["retriever"])
    index = ["index", "build", "--catalog", args.catalog, "--id-column", args.id_column,
             "--text-column", args.text_column, "--collection", args.collection,
             "--index-dir", str(output / STAGE_DIRS["index"]), "--model", retriever, *quiet]
    if args.catalog_format:
        index += ["--format", args.catalog_format]
    if args.instruction:
        index += ["--instruction", args.instruction]
    return [
        ("retriever", ["train-retriever", *data, *split, "--output", retriever, *quiet,
                       *shlex.split(args.retriever_args)]),
        ("index", index),
        ("reranker", ["train-reranker", *data, *split, "--retriever", retriever, "--output",
                      str(output / STAGE_DIRS["reranker"]), *quiet,
                      *(["--instruction", args.instruction] if args.instruction else []),
                      *shlex.split(args.reranker_args)]),
    ]


def _run_stage(argv: list[str]) -> int:
    """One stage's command, parsed and run as `rankd` runs it."""
    from reranker.cli import register as reranker_commands
    from retriever.cli import register as retriever_commands

    parser = argparse.ArgumentParser(prog="rankd")
    sub = parser.add_subparsers(dest="command", required=True)
    retriever_commands(sub)
    reranker_commands(sub)
    args = parser.parse_args(argv)
    args.argv = argv
    code: int = args.handler(args)
    return code


def _train_pipeline(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.exists() and any(output.iterdir()):
        if not args.overwrite:
            print(f"rankd train-pipeline: {output} is not empty; pass --overwrite to replace an "
                  "earlier pipeline", file=sys.stderr)
            return 2
        if not (output / PIPELINE_FILE).is_file():
            print(f"rankd train-pipeline: {output} is not empty and holds no {PIPELINE_FILE}: "
                  "it is not an earlier pipeline, so it is not deleted; choose another --output",
                  file=sys.stderr)
            return 2
        shutil.rmtree(output)
    output.mkdir(parents=True, exist_ok=True)
    argv = list(args.argv)
    seconds: dict[str, float] = {}
    _write(output, _manifest(output, "started", argv, seconds))
    for stage, command in _stage_commands(args, output):
        print(f"rankd train-pipeline: {stage}: rankd {shlex.join(command)}", file=sys.stderr)
        started = time.perf_counter()
        # Each stage prints its own JSON summary; the pipeline's stdout is its manifest alone.
        with contextlib.redirect_stdout(sys.stderr):
            code = _run_stage(command)
        seconds[stage] = round(time.perf_counter() - started, 1)
        if code != 0:
            _write(output, _manifest(output, f"failed at the {stage}", argv, seconds))
            print(f"rankd train-pipeline: the {stage} stage failed (exit {code}); what the "
                  f"stages before it wrote is kept in {output}", file=sys.stderr)
            return code
        _write(output, _manifest(output, f"{stage} done", argv, seconds))
    manifest = _manifest(output, "complete", argv, seconds)
    _write(output, manifest)
    print(json.dumps({"output": str(output.resolve()), **manifest}, indent=2))
    print(f"rankd train-pipeline: serve it with RANKD_PIPELINE_DIR={output} rankd serve",
          file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from retriever.cli import add_training_data_options

    train = sub.add_parser(
        "train-pipeline",
        help="train the retriever, index the catalogue with it and train the reranker on its "
             "candidates, into one directory that `rankd serve` serves",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_data_options(train)
    train.add_argument("--collection", default="misconceptions",
                       help="the collection's name in the index (default misconceptions)")
    train.add_argument("--instruction", help="the collection's rerank instruction (default: the "
                                             "reranker's)")
    split = train.add_argument_group("the split both trainers share")
    split.add_argument("--seed", type=int, default=42)
    split.add_argument("--validation-fraction", type=float, default=0.2)
    split.add_argument("--test-fraction", type=float, default=0.2)
    train.add_argument("--retriever-args", default="",
                       help="more `rankd train-retriever` options, as one quoted string")
    train.add_argument("--reranker-args", default="",
                       help="more `rankd train-reranker` options, as one quoted string")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(handler=_train_pipeline)
