#!/bin/sh
# The vLLM-CPU image's entrypoint: vLLM's OpenAI-compatible server, with --dtype chosen as rankd
# chooses RANKD_RERANKER_DTYPE=auto (reranker/precision.py): bfloat16 on a CPU with AMX-BF16 or
# AVX512-BF16, where it computes natively, and float32 on others, where bfloat16 is emulated and
# slower. RANKD_CPU_VLLM_DTYPE (auto, float32, bfloat16) decides instead when it is not auto; a
# 4-bit model needs bfloat16. Every argument goes on to the server.
set -eu
dtype=${RANKD_CPU_VLLM_DTYPE:-auto}
if [ "$dtype" = auto ]; then
  if grep -qwE 'amx_bf16|avx512_bf16' "${RANKD_CPUINFO:-/proc/cpuinfo}"; then
    dtype=bfloat16
  else
    dtype=float32
  fi
fi
echo "rankd-vllm-cpu: --dtype $dtype (RANKD_CPU_VLLM_DTYPE=${RANKD_CPU_VLLM_DTYPE:-auto})" >&2
exec python -m vllm.entrypoints.openai.api_server --dtype "$dtype" "$@"
