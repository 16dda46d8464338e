#!/usr/bin/env bash
# infinity-emb, the peer in bench/retrieval.py, in its own virtual environment cached outside
# the clone (it pins sentence-transformers 3 and transformers 4). Prints the venv's python on
# its last line.
#   RANKD_INFINITY_VENV  where the venv lives (default ~/.cache/rankd/infinity-0.0.78)
set -euo pipefail
venv=${RANKD_INFINITY_VENV:-$HOME/.cache/rankd/infinity-0.0.78}
marker="$venv/.rankd-ready"
if [ ! -f "$marker" ]; then
  python=${PYTHON:-python3}
  rm -rf "$venv"
  "$python" -m venv "$venv"
  pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
  # torch first: the local CPU wheel, so nothing resolves a CUDA build.
  pip install torch==2.13.0
  pip install "infinity-emb[server,torch]==0.0.78"
  "$venv/bin/python" -c "import infinity_emb.infinity_server, sentence_transformers" \
    || { echo "setup_infinity: infinity-emb does not import in $venv" >&2; exit 1; }
  touch "$marker"
fi
echo "$venv/bin/python"
