"""`rankd train-reranker` in float32 against bfloat16 autocast: examples per second and the loss.

Runs the real command twice on the same data, options and seed, differing only in
``RANKD_RERANKER_DTYPE`` (float32, then bfloat16: what ``auto`` takes on a CPU with AMX-BF16 or
AVX512-BF16, as autocast over float32 weights), each with a small evaluation so the training
dominates. Prints the host's CPU and bf16 flags, the load average, each run's training seconds
per example and loss at every logged step, and the ratio.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/training_precision.py --data ../shared/data/eedi \
        --retriever ../runs/minilm-eedi --examples 64

A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from reranker.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name


def run(dtype: str, args: argparse.Namespace, output: Path) -> dict[str, object]:
    command = [sys.executable, "-m", "rankd.cli", "train-reranker", "--train",
               str(args.data / "train.csv"), "--format", "eedi", "--catalog",
               str(args.data / "misconception_mapping.csv"), "--output", str(output), "--quiet",
               "--examples", str(args.examples), "--fusion-queries", "20", "--eval-queries",
               "20", "--curve-points", "0", "--scoring", args.scoring]
    if args.retriever:
        command += ["--retriever", args.retriever]
    env = {**os.environ, "RANKD_RERANKER_DTYPE": dtype}
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    report = json.loads((output / "training_report.json").read_text())
    return {"precision": report["precision"]["training"],
            "seconds_per_example": report["seconds"]["train_per_example"],
            "train_seconds": report["seconds"]["train"],
            "loss": [row["loss"] for row in report["train_loss"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the Eedi data directory")
    parser.add_argument("--retriever", help="the retriever whose candidates train (default: "
                                            "the zero-shot embedder)")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--scoring", default="pointwise", choices=["pointwise", "listwise"])
    args = parser.parse_args()
    flags = cpu_flags()
    print(f"CPU: {cpu_model_name()}; bf16 flags: "
          f"{', '.join(f for f in NATIVE_BF16_FLAGS if f in flags) or 'none (AVX2 only)'}; "
          f"cores: {os.cpu_count()}; load average at start: {os.getloadavg()}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rankd-bench-precision-") as tmp:
        for dtype in ("float32", "bfloat16"):
            results[dtype] = run(dtype, args, Path(tmp) / dtype)
            print(json.dumps({dtype: results[dtype]}), flush=True)
    f32, bf16 = results["float32"], results["bfloat16"]
    print("\n| precision | s per example | loss at each logged step |\n|---|---|---|")
    for row in results.values():
        losses = ", ".join(f"{v:.3f}" for v in row["loss"])  # type: ignore[attr-defined]
        print(f"| {row['precision']} | {row['seconds_per_example']} | {losses} |")
    ratio = float(f32["seconds_per_example"]) / float(bf16["seconds_per_example"])  # type: ignore[arg-type]
    print(f"\nbfloat16 autocast: {ratio:.2f}x float32's examples per second "
          f"(load average at end: {os.getloadavg()})")


if __name__ == "__main__":
    main()
