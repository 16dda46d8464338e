#!/usr/bin/env bash
# The retriever's arms, one run at a time, each differing from the defaults in one option:
#   bash bench/retriever_arms.sh DATA_DIR RUNS_DIR ARM [ARM ...]
# ARM is NAME=OPTIONS, e.g. 'neg3=--negatives 3' or 'baseline='. Each run writes
# RUNS_DIR/retriever-NAME/ (the model, training_report.json, validation.csv, test.csv) and
# RUNS_DIR/retriever-NAME.log with the host (lscpu), the load before and after, the exact
# command and /usr/bin/time -v (wall time, peak memory). Arms are judged on validation
# (`fine_tuned.map@25` in the report); the test split is scored once, at the end
# (bench/test_report.py).
set -uo pipefail
cd "$(dirname "$0")/.."
data=$1 runs=$2
shift 2
mkdir -p "$runs"
for arm in "$@"; do
  name=${arm%%=*} options=${arm#*=}
  out="$runs/retriever-$name" log="$runs/retriever-$name.log"
  if [ -f "$out/training_report.json" ] && grep -q '"status": "complete"' "$out/training_report.json"; then
    echo "skip $name: complete"; continue
  fi
  {
    date -u +%FT%TZ
    lscpu | grep -E "Model name|^Flags" | sed 's/^Flags:.*/Flags: '"$(grep -o -w -E 'avx2|avx512f|avx512_bf16|avx512_vnni|amx_bf16' /proc/cpuinfo | sort -u | tr '\n' ' ')"'/'
    echo "load before: $(cat /proc/loadavg)"
    # shellcheck disable=SC2086
    echo "command: .venv/bin/rankd train-retriever --train $data/train.csv --format eedi --catalog $data/misconception_mapping.csv --output $out --quiet --overwrite $options"
  } > "$log"
  # shellcheck disable=SC2086
  /usr/bin/time -v .venv/bin/rankd train-retriever --train "$data/train.csv" --format eedi \
    --catalog "$data/misconception_mapping.csv" --output "$out" --quiet --overwrite $options \
    >> "$log" 2>&1
  echo "exit $? load after: $(cat /proc/loadavg)" >> "$log"
done
