"""Fairness under steady load: `rankd batch` at several concurrencies against one `rankd serve`.

Starts the service (a child process, the settings from the environment, e.g.
``RANKD_RERANKER_MODEL`` and ``RANKD_INDEX_DIR``), then runs `rankd batch` over the same queries
at each ``--concurrency`` in turn, the first 1 so every query has a solo time. For each run it
reports the latency median and p99 of the /rank answers (``timings_ms.total``), p99 over the
median, and the queries answered unreranked because the reranker timed out, with their solo
times: the goal is that no query whose solo time is under a tenth of the timeout times out.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fairness.py --input ../runs/minilm-eedi/validation.csv \
        --format eedi --limit 300 --concurrency 1 4 8 16

A benchmark, not a test: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rankd.devtools.ports import free_port
from rankd.devtools.processes import stop_process
from rankd.devtools.serving import start_child
from reranker.config import RerankerConfig
from reranker.precision import NATIVE_BF16_FLAGS, cpu_flags, cpu_model_name


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def _limited(source: Path, fmt: str, limit: int, target: Path) -> Path:
    """The first ``limit`` queries' rows of an Eedi CSV or JSONL file (0: all)."""
    if not limit:
        return source
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if fmt == "eedi":  # rows are questions of up to three queries each
        import csv
        import io

        rows = list(csv.DictReader(io.StringIO("".join(lines))))
        kept, queries = [], 0
        for row in rows:
            if queries >= limit:
                break
            kept.append(row)
            queries += sum(1 for a in "ABCD" if row.get(f"Misconception{a}Id"))
        with target.open("w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(kept)
        return target
    target.write_text("".join(lines[:limit]), encoding="utf-8")
    return target


def _run(url: str, queries: Path, fmt: str, concurrency: int, output: Path,
         candidates: int | None) -> dict[str, dict[str, Any]]:
    command = [str(Path(sys.executable).parent / "rankd"), "batch", "--url", url, "--input",
               str(queries), "--format", fmt, "--output", str(output), "--quiet",
               "--concurrency", str(concurrency)]
    if candidates:
        command += ["--candidates", str(candidates)]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    answers = {}
    for line in output.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers[row["id"]] = row.get("response") or {}
    return answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--format", default="eedi")
    parser.add_argument("--limit", type=int, default=0, help="queries (0: all)")
    parser.add_argument("--candidates", type=int, help="per query (default: the service's)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = parser.parse_args()
    flags = cpu_flags()
    print(f"CPU: {cpu_model_name()}; bf16 flags: "
          f"{', '.join(f for f in NATIVE_BF16_FLAGS if f in flags) or 'none (AVX2 only)'}; "
          f"load average at start: {os.getloadavg()}", flush=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Quiet: the child's stderr is a pipe nobody reads until it exits.
    env = {"RANKD_LOG_LEVEL": "warning", **os.environ, "RANKD_HOST": "127.0.0.1",
           "RANKD_PORT": str(port)}
    server = start_child([str(Path(sys.executable).parent / "rankd"), "serve"], env,
                         f"{url}/ready", "rankd serve", timeout_s=600)
    # The server's budget, read as the server reads it.
    timeout = RerankerConfig.from_env().timeout_s
    solo: dict[str, float] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="rankd-bench-fairness-") as tmp:
            queries = _limited(args.input, args.format, args.limit, Path(tmp) / "queries.csv")
            print("| concurrency | queries | median s | p99 s | p99 / median | reranker "
                  "timeouts | their solo times (s) |\n|---|---|---|---|---|---|---|", flush=True)
            for concurrency in args.concurrency:
                answers = _run(url, queries, args.format, concurrency,
                               Path(tmp) / f"c{concurrency}.jsonl", args.candidates)
                seconds = {k: a["timings_ms"]["total"] / 1000 for k, a in answers.items()
                           if a.get("timings_ms")}
                if concurrency == 1 and not solo:
                    solo = seconds
                timed_out = [k for k, a in answers.items()
                             if any("timeout" in w for w in a.get("warnings", []))]
                values = list(seconds.values())
                median, p99 = statistics.median(values), _percentile(values, 0.99)
                solos = ", ".join(f"{solo.get(k, float('nan')):.2f}" for k in timed_out)
                print(f"| {concurrency} | {len(values)} | {median:.2f} | {p99:.2f} | "
                      f"{p99 / median:.1f} | {len(timed_out)} | {solos or '-'} |", flush=True)
            short = [k for k, s in solo.items() if s < timeout / 10]
            print(f"\n{len(short)} of {len(solo)} queries take under a tenth of the "
                  f"{timeout:g} s timeout alone. Load average at end: {os.getloadavg()}")
    finally:
        stop_process(server)


if __name__ == "__main__":
    main()
