"""The CUDA C++ 4-bit dequantize-GEMV (``csrc/gemv_int4.cu``), built on first use with
``torch.utils.cpp_extension.load`` where a CUDA build of torch and nvcc are installed."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

CSRC = Path(__file__).resolve().parent / "csrc"


def unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return "this torch is a CPU build (torch.version.cuda is None)"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc / CUDA_HOME was not found"
    return None


@functools.lru_cache(maxsize=1)
def extension():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the CUDA extension cannot be built: {reason}")
    from torch.utils.cpp_extension import load

    return load(name="llmpress_gemv_int4", sources=[str(CSRC / "gemv_int4_binding.cpp"), str(CSRC / "gemv_int4.cu")],
                extra_cuda_cflags=["-O3"], verbose=False)


def gemv_int4(layer, x: torch.Tensor) -> torch.Tensor:
    """``x [M ≤ 8, K] fp16 · Wᵀ`` for a 4-bit ``QuantLinear`` on CUDA (no bias)."""
    if layer.bits != 4:
        raise ValueError("the CUDA GEMV is 4-bit")
    return extension().gemv_int4(x.half(), layer.qweight, layer.scales, layer.qzeros, layer.g_idx,
                                 max(layer.group_size, 1))
