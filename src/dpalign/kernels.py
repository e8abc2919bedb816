"""The second CPU kernel set to test under: ``python -m dpalign.kernels`` prints it as
``NAME=value`` environment settings for ``env``.

torch picks its vectorised ATen kernels by CPU (``ATEN_CPU_CAPABILITY``) and MKL its BLAS
code path (``MKL_ENABLE_INSTRUCTIONS``); the same model rounds differently under each. To
catch a result that depends on one CPU's rounding, the suite is rerun one level down from
what this machine would use: AVX-512 -> AVX2, AVX2 -> the scalar (default / SSE4.2) set.
"""

from __future__ import annotations

import torch

# the machine's own capability -> (ATEN_CPU_CAPABILITY, MKL_ENABLE_INSTRUCTIONS) one level down
SECOND_SET = {"AVX512": ("avx2", "AVX2"), "AVX2": ("default", "SSE4_2")}


def second_kernel_set(capability: str | None = None) -> dict[str, str]:
    """The environment for the second kernel set on a CPU of ``capability`` (this one's by
    default, as torch reports it: ``AVX512``, ``AVX2``, ``DEFAULT``...)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    aten, mkl = SECOND_SET.get(capability, ("default", "SSE4_2"))
    return {"ATEN_CPU_CAPABILITY": aten, "MKL_ENABLE_INSTRUCTIONS": mkl}


if __name__ == "__main__":
    print(" ".join(f"{k}={v}" for k, v in second_kernel_set().items()))
