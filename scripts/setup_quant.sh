#!/usr/bin/env bash
# llm-compressor (the [quant] extra) in its own virtual environment, cached outside the clone,
# for `rankd quantize` and its test. Its own venv because llmcompressor 0.14 pins
# transformers <= 5.17 while rankd's .venv runs a newer transformers. Prints the venv's python
# on its last line. rankd itself is not installed there: run it from a checkout
# (`<python> -m rankd.cli quantize ...` in the repository root). rankd's dependencies are
# installed again whenever pyproject.toml changes.
#   RANKD_QUANT_VENV  where the venv lives (default ~/.cache/rankd/quant-llmcompressor-0.14.0.1)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${RANKD_QUANT_VENV:-$HOME/.cache/rankd/quant-llmcompressor-0.14.0.1}
marker="$venv/.rankd-ready"
stamp=$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$marker" ] || [ "$(cat "$marker")" != "$stamp" ]; then
  started=$(date +%s)
  pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  if [ ! -x "$venv/bin/python" ]; then
    "${PYTHON:-python3}" -m venv "$venv"
    pip install --upgrade pip
    # torch first and pinned, so that nothing below resolves another build.
    pip install torch==2.13.0
  fi
  # rankd's dependencies with the [quant] extra, then rankd itself out again: the code runs
  # from the checkout, so a venv shared between clones never holds a stale copy of it.
  pip install "llmcompressor==0.14.0.1" ".[quant]"
  pip uninstall -y rankd
  "$venv/bin/python" -c "import llmcompressor, compressed_tensors, faiss, sentence_transformers" \
    || { echo "setup_quant: llmcompressor does not import in $venv" >&2; exit 1; }
  echo "setup_quant: ready in $(( $(date +%s) - started ))s, $(du -sh "$venv" | cut -f1)" >&2
  echo "$stamp" > "$marker"
fi
echo "$venv/bin/python"
