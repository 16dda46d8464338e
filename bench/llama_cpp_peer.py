"""llama.cpp's side of bench/cpu_engines.py: the same token ids, through llama-cpp-python.

Runs in llama.cpp's own venv (scripts/setup_llama_cpp.sh), so it imports nothing of rankd. It
reads a JSON file of queries, each a list of reads (a prompt's token ids and its label token
ids), and writes per query the time of its reads and their label log-softmax:

- ``unshared``: each prompt evaluated whole from an empty cache;
- ``shared``: the query's common prefix evaluated once, each prompt's rest over it (llama.cpp
  keeps the prefix's keys and values and drops the rest), as rankd's prefix sharing does.

Logits are read at the last position only (``logits_all`` off). ``--quantize SRC DST TYPE``
writes a GGUF file in another type (Q8_0, Q4_K_M) through llama.cpp's own quantizer instead.

    PY=$(bash scripts/setup_llama_cpp.sh)
    $PY bench/llama_cpp_peer.py --model FILE.gguf --reads reads.json --threads 2 --out out.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

TYPES = {"Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}


def quantize(source: Path, target: Path, kind: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = TYPES[kind]
    params.allow_requantize = True  # the shipped file is Q4_1, not f16
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(),
                                      ctypes.byref(params)) != 0:
        raise SystemExit(f"llama.cpp could not quantize {source} to {kind}")


def label_log_softmax(llm: Any, labels: list[int]) -> list[float]:
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    chosen = logits[labels].astype(np.float64)
    chosen -= chosen.max()
    return (chosen - np.log(np.exp(chosen).sum())).tolist()


def common_prefix(prompts: list[list[int]]) -> int:
    shortest = min(len(p) for p in prompts)
    n = 0
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--reads", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--quantize", nargs=3, metavar=("SRC", "DST", "TYPE"))
    args = parser.parse_args()
    if args.quantize:
        source, target, kind = args.quantize
        quantize(Path(source), Path(target), kind)
        return 0
    queries = json.loads(args.reads.read_text(encoding="utf-8"))
    longest = max(len(r["prompt"]) for q in queries for r in q)
    llm = llama_cpp.Llama(model_path=str(args.model), n_ctx=longest + 8, n_batch=longest + 8,
                          n_ubatch=longest + 8, n_threads=args.threads,
                          n_threads_batch=args.threads, logits_all=False, verbose=False)
    results: dict[str, list[Any]] = {"unshared": [], "shared": []}
    for query in queries:
        prompts = [r["prompt"] for r in query]
        started = time.perf_counter()
        rows = []
        for read in query:
            llm.reset()
            llm.eval(read["prompt"])
            rows.append(label_log_softmax(llm, read["labels"]))
        results["unshared"].append({"seconds": time.perf_counter() - started, "logprobs": rows})
        started = time.perf_counter()
        prefix = common_prefix(prompts)
        llm.reset()
        llm.eval(prompts[0][:prefix])
        rows = []
        for read in query:
            llm.n_tokens = prefix  # eval drops the cache past n_tokens first
            llm.eval(read["prompt"][prefix:])
            rows.append(label_log_softmax(llm, read["labels"]))
        results["shared"].append({"seconds": time.perf_counter() - started, "logprobs": rows})
    args.out.write_text(json.dumps({"llama_cpp_version": llama_cpp.__version__,
                                    "system_info": llama_cpp.llama_print_system_info().decode(),
                                    "threads": args.threads, **results}), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
