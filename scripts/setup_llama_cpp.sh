#!/usr/bin/env bash
# llama.cpp's Python binding (llama-cpp-python), built from source for this CPU (GGML_NATIVE),
# in its own virtual environment cached outside the clone: the peer that bench/cpu_engines.py
# measures rankd against. Its tools quantize GGUF files (Q8_0, Q4_K_M) through the binding.
# Prints the venv's python on its last line.
#   RANKD_LLAMA_CPP_VENV  where the venv lives (default ~/.cache/rankd/llama-cpp-0.3.36)
set -euo pipefail
venv=${RANKD_LLAMA_CPP_VENV:-$HOME/.cache/rankd/llama-cpp-0.3.36}
marker="$venv/.rankd-ready"
if [ ! -f "$marker" ]; then
  started=$(date +%s)
  python=${PYTHON:-python3}
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  pip install --upgrade pip
  # Only the source distribution exists on the registry: pip builds it with CMake for the host
  # CPU (AVX2, AVX-512, AMX as it has them).
  CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python \
    llama-cpp-python==0.3.36 numpy
  "$venv/bin/python" -c "import llama_cpp" >/dev/null 2>&1 \
    || { echo "setup_llama_cpp: llama_cpp does not import in $venv" >&2; exit 1; }
  echo "setup_llama_cpp: built in $(( $(date +%s) - started ))s, $(du -sh "$venv" | cut -f1)" >&2
  touch "$marker"
fi
echo "$venv/bin/python"
