"""Which dtype the in-process reranker runs in, and why.

``RANKD_RERANKER_DTYPE=auto`` takes bfloat16 where the hardware computes it natively and
float32 elsewhere:

- a CUDA GPU: bfloat16 where it is supported, else float16;
- a CPU with AMX-BF16 (Intel Sapphire Rapids and later) or AVX512-BF16: bfloat16. Measured on
  SmolLM2-135M with 2 AMX cores: 3.5x float32's speed, the same top label, MAP@25 unchanged
  (docs/experiments.md, "bf16 on CPUs that have it");
- any other CPU (AVX2 only): float32. bfloat16 is emulated there and is slower than float32
  (measured in the same section).

The choice and its reason are logged at start-up and shown in ``/ready``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")
# The CPU flags (as /proc/cpuinfo names them) under which bfloat16 matrix work is native.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclass(frozen=True)
class DtypeChoice:
    name: str  # float32, float16 or bfloat16
    reason: str

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"

    def torch_dtype(self) -> object:
        import torch

        return getattr(torch, self.name)


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return ""


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's /proc/cpuinfo); empty where they cannot be read."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def cpu_model_name() -> str:
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.partition(":")[2].strip()
    return "unknown CPU"


def choose_dtype(setting: str, device: str, flags: frozenset[str] | None = None,
                 cuda_bf16: bool | None = None) -> DtypeChoice:
    """The dtype for ``setting`` (one of DTYPES) on ``device`` (cpu, cuda, cuda:N).

    ``flags`` are the CPU's (default: this machine's); ``cuda_bf16`` whether the GPU supports
    bfloat16 (default: asked of torch)."""
    if setting not in DTYPES:
        raise ValueError(f"unknown dtype {setting!r}; choose one of {', '.join(DTYPES)}")
    if setting != "auto":
        return DtypeChoice(setting, "RANKD_RERANKER_DTYPE")
    if device.startswith("cuda"):
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
        return (DtypeChoice("bfloat16", "auto: the GPU supports bfloat16") if cuda_bf16
                else DtypeChoice("float16", "auto: the GPU has no bfloat16"))
    flags = cpu_flags() if flags is None else flags
    native = [flag for flag in NATIVE_BF16_FLAGS if flag in flags]
    if native:
        return DtypeChoice("bfloat16", f"auto: the CPU has {native[0]}")
    return DtypeChoice("float32", "auto: the CPU has neither amx_bf16 nor avx512_bf16, so "
                                  "bfloat16 would be emulated and slower")
