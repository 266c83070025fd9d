"""The C++ CPU kernels (``csrc/cpu_kernels.cpp``): the lookup-table GEMV of binary-coded weights
for decoding, their dequantizer, the uniform format's dequantizer for prefill, and the decoding
GEMVs of half-precision weights and of column-sparse (ELL) coefficients; built on first
use with torch's extension builder, which also registers them as torch operators
(``torch.ops.llmpress.*``) for compiled graphs. Where they cannot be built (no compiler), ``extension()`` says
so once and returns None, and the torch LUT (``kernels.lut``) and dequantizers serve instead.
``binary_coded_matmul`` is the one path of binary-coded layers on every device."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from .lut import lut_gemv_scaled

CSRC = Path(__file__).resolve().parent / "csrc"


@functools.lru_cache(maxsize=1)
def _build():
    try:
        from torch.utils.cpp_extension import load

        # built here, for this machine: its vector units are known (the loops are written to vectorise)
        vector = ["-mavx2", "-mfma", "-mf16c"] if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512") else []
        module = load(name="llmpress_cpu_kernels", sources=[str(CSRC / "cpu_kernels.cpp")],
                      extra_cflags=["-O3", "-fopenmp", *vector], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: the torch path serves
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        warnings.warn(f"llmpress: the C++ CPU kernels could not be built ({first}); packed layers run on the "
                      "slower torch paths", RuntimeWarning, stacklevel=2)
        return None
    _register_shapes()
    _built.append(module)
    _lut_vector.append(module.lut_gemv_vector())
    return module


_built: list = []   # the module once built: read while torch.compile traces, which cannot call _build
_lut_vector: list = []   # whether its LUT GEMV has the AVX-512 path here, read the same way


def extension():
    """The built module (``lut_gemv``, ``half_gemv``, ``int4_rows``, the dequantizers, ...), or None
    where it cannot be built. While torch.compile traces a model (a compiled decoding step), the same
    kernels as torch operators, ``torch.ops.llmpress``, which a graph can hold; the nested-list
    calls (``harp_int4_rows``, ``butterfly_rows_many``) are not among them, and their callers take
    their per-operand path there."""
    if torch.compiler.is_compiling():
        return torch.ops.llmpress if _built else None
    return _build()


def uniform_gemv_fast(bits: int, in_features: int, group_size: int) -> bool:
    """Whether ``uniform_gemv`` runs a uniform layer of this shape (contiguous groups) on its AVX-512
    path, which decodes the stored codes in registers (1.0-1.4x the time of torch's int4 GEMM on a
    copy of them): this CPU has AVX512-VBMI and -BF16, 2-4 bits, groups of a multiple of 64 columns."""
    module = _build()
    return module is not None and module.uniform_gemv_fast(bits, in_features, group_size)


def _register_shapes() -> None:
    """What each operator returns, for tracing: a new tensor of the output's shape and dtype."""

    def shape_of(name):
        return torch.library.register_fake(f"llmpress::{name}")

    @shape_of("butterfly_rows")
    def _(x, signs, blocks, strides, transpose):
        return torch.empty_like(x)

    @shape_of("int4_rows")
    def _(x, weight, group_size, scales_and_zeros, perm, padding, bias):
        dtype = x.dtype if bias is None else torch.promote_types(bias.dtype, scales_and_zeros.dtype)
        return x.new_empty(*x.shape[:-1], weight.shape[0], dtype=dtype)

    @shape_of("lut_gemv")
    def _(x, sign_bits, alpha, col_block):
        return x.new_empty(x.shape[0], sign_bits.shape[1])

    @shape_of("dequantize")
    def _(sign_bits, alpha, col_block, k):
        return alpha.new_empty(sign_bits.shape[1], k)

    @shape_of("dequantize_uniform")
    def _(qweight, scales, qzeros, g_idx, bits, k, group_size, columns):
        return scales.new_empty(qweight.shape[0], k, dtype=torch.float32)

    @shape_of("uniform_gemv")
    def _(x, qweight, scales, qzeros, perm, bits, group_size):
        return x.new_empty(x.shape[0], qweight.shape[0])

    @shape_of("uniform_gemv_group")
    def _(x, qweights, scales, qzeros, perm, bits, group_size):
        return [x.new_empty(x.shape[0], q.shape[0]) for q in qweights]

    @shape_of("half_gemv")
    def _(x, weight):
        return x.new_empty(x.shape[0], weight.shape[0])

    @shape_of("int8_rows_gemv")
    def _(x, codes, scale):
        return x.new_empty(x.shape[0], codes.shape[0])

    @shape_of("ell_gemv")
    def _(h, values, index):
        return h.new_empty(h.shape[0], values.shape[0])

    @shape_of("affine_gemv")
    def _(x, codes, step, offset, sub):
        return x.new_empty(x.shape[0], codes.shape[0])

    @shape_of("hadamard_rows")
    def _(x, signs, lead, inner):
        return torch.empty_like(x)


# Decoding batches take the LUT GEMV, larger inputs dequantize once per call. The LUT grows with
# every row where the GEMM hardly does. Its AVX-512 path (16 rows' nibbles a table lookup) stays
# below a dequantize-and-GEMM to 16 rows and beyond (576x1536, 3 bits, 2 threads: 0.05 against 0.42 ms
# at one row, 0.37 against 0.73 at 16); the portable loop (one lookup per row and byte) only to 4
# (0.21 against 0.86 ms at one row, even at 4). Triton's LUT GEMV takes up to 8.
CPU_LUT_MAX_TOKENS = {"vector": 16, "portable": 4}
LUT_MAX_TOKENS = 8


def cpu_lut_max_tokens() -> int:
    """The most rows a CPU LUT GEMV takes here: the C++ kernel's path decides where a dequantize-
    and-GEMM gets cheaper (the torch LUT, where nothing was built, is the portable case)."""
    return CPU_LUT_MAX_TOKENS["vector" if _lut_vector and _lut_vector[0] else "portable"]


def triton_lut_ready() -> bool:
    try:
        from . import triton_bcq
    except ImportError:
        return False
    return triton_bcq.available()


def binary_coded_matmul(x: torch.Tensor, sign_bits: torch.Tensor, alpha: torch.Tensor, col_block: int,
                        dense: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``x [B, K] · Wᵀ`` for sign planes ``[q, N, ceil(K/32)]`` with float scales ``alpha [q, R, C]``
    (one per ``N/R`` rows × ``col_block`` columns). Decoding batches take a LUT GEMV (C++ or torch on
    CPU, Triton on CUDA); larger inputs dequantize once for this call, and nothing dense is kept.
    ``dense()`` is the format's own dequantizer: the reference (``LLMPRESS_KERNEL=reference``)."""
    from .dispatch import get_backend

    out_features = sign_bits.shape[1]
    if get_backend() == "reference":
        return x @ dense().to(x.dtype).T
    if x.is_cuda:
        if x.shape[0] > LUT_MAX_TOKENS or col_block % 8 or not triton_lut_ready():
            return x @ dense().to(x.dtype).T
        from .triton_bcq import scaled_gemv

        return scaled_gemv(x, sign_bits, alpha, col_block, out_features)
    ext = extension()   # built before the row limit is read: the limit depends on its path
    if x.shape[0] <= cpu_lut_max_tokens() and col_block % 8 == 0:
        if ext is None:
            return lut_gemv_scaled(x, sign_bits, alpha, col_block, out_features)
        return ext.lut_gemv(x.to(torch.float32), sign_bits, alpha.to(torch.float32), col_block).to(x.dtype)
    weight = dense() if ext is None else ext.dequantize(sign_bits, alpha.to(torch.float32), col_block, x.shape[1])
    return x @ weight.to(x.dtype).T
