#!/usr/bin/env bash
# Create .venv and install rankd into it (editable). `--dev` adds the test and lint tools.
# torch is pinned first: 2.13.0 is the CPU wheel this project's machines provide, and installing
# it before anything else stops a dependency from pulling the multi-gigabyte CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
torch_spec=${RANKD_TORCH_SPEC:-torch==2.13.0}
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check "$torch_spec" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import torch, faiss, sentence_transformers, service.app" \
  || { echo "bootstrap: rankd did not install cleanly" >&2; exit 1; }
