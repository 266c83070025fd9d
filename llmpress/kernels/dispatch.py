"""Which kernel computes a packed layer's ``x · Wᵀ``: the fastest correct path for the layer and
the input's device, with the torch reference as the oracle and the fallback.

- ``reference``: dequantize with torch, then a dense matmul in the input's dtype. Exact to the
  format; every other path is tested against it.
- ``cpu-gemv``: decoding inputs (at most ``DECODE_MAX_ROWS`` rows) on CPU through the C++ GEMV
  (``kernels.cpu_ext``), which reads the packed codes as stored. ``auto`` takes it first where its
  AVX-512 path runs the layer (2-4 bits, contiguous groups of a multiple of 64, act-order layers
  held in group order: bf16 inputs, fp32 sums; nothing is held beside the codes), and for the layers
  the int4 kernel cannot take (8-bit codes, other group sizes) whose groups are contiguous (fp32).
- ``cpu-int4``: torch's packed int4 CPU GEMM (``kernels.cpu_int4``), bf16 activations, on a copy of
  the codes in its layout. ``auto`` takes it for the other 2-, 3- and 4-bit layers it fits when
  decoding.
- Linears that read one input (q/k/v, gate/up; ``layers.shared_input``) run as one call on either
  CPU decoding path: one int4 GEMM (``cpu_int4.SharedInputGemm``) or one GEMV call
  (``SharedInputGemv``).
- ``cpu-gemv`` also runs GGML block weights (``layers.GGMLLinear``) for decoding inputs: the C++
  affine GEMV on their codes decoded to bytes once (``ggml_linear``); larger inputs compute the
  weight from those codes per call.
- ``cpu-dequant``: larger inputs on CPU (prefill, the fp32 perplexity protocol): the C++
  dequantizer (``kernels.cpu_ext``, identical to the reference's weights, several times faster),
  then one fp32 GEMM; the weight lives for that call only.
- ``half_weight_gemv``: one decoding row against fp16/bf16 weights (the stored head, the linears
  left dense, half-precision factors): the C++ GEMV, fp32 products.
- ``triton``: the Triton kernels (``kernels.triton_uniform``) on CUDA devices: the GEMV for
  decoding, the fused GEMM or dequantize-once and cuBLAS for prefill.

``set_backend``/``use_backend`` force a path (``auto`` by default); a path that cannot run the
layer falls back to the reference.
"""

from __future__ import annotations

import contextlib
import os

import torch

from ..formats.ggml import dequantize_codes
from . import cpu_ext, cpu_int4
from .grouping import SharedInputGroup, same_optional

BACKENDS = ("auto", "reference", "cpu-int4", "cpu-gemv", "cpu-dequant", "triton")
DECODE_MAX_ROWS = 16
_backend = os.environ.get("LLMPRESS_KERNEL", "auto")


def set_backend(name: str) -> None:
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {', '.join(BACKENDS)}")
    _backend = name


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str):
    previous = _backend
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _triton_ready() -> bool:
    try:
        from . import triton_uniform
    except ImportError:
        return False
    return triton_uniform.available()


def gemv_fits(layer) -> bool:
    """Whether the C++ GEMV can run ``layer``: contiguous groups, widths of whole 8-code chunks."""
    group = layer.group_size if layer.group_size > 0 else layer.in_features
    return (layer.g_idx is None or layer.n_groups == 1) and layer.in_features % 8 == 0 and group % 8 == 0


def gemv_can_share_input(layers) -> bool:
    """Whether ``layers`` can run as one call of the C++ GEMV's AVX-512 path: each takes that path,
    and they read their input the same way (width, group size, column order). Bit widths may differ."""
    first = layers[0]
    for layer in layers:
        if not layer.cpu_gemv_fast() or layer.in_features != first.in_features or layer.group_size != first.group_size:
            return False
        if not same_optional(layer.input_order, first.input_order):
            return False
    return True


class SharedInputGemv(SharedInputGroup):
    """Uniform linears that read one input tensor (``SharedInputGroup``) in one call of the C++
    GEMV's AVX-512 path: the input is converted, interleaved and summed once, and one parallel loop
    runs every member's rows. Per decoded token of SmolLM2 that is 90 calls fewer (q/k/v and
    gate/up), each some 15-25 µs of Python and kernel set-up beyond its weights."""

    path = "cpu-gemv"

    def __init__(self, members) -> None:
        if len(members) < 2 or not gemv_can_share_input(members):
            raise ValueError("these linears cannot share one GEMV call")
        super().__init__(members)
        self._bits = [m.bits for m in self.members]
        self._sizes = [m.out_features for m in self.members]

    def compute(self, x: torch.Tensor) -> list[torch.Tensor]:
        # the packed tensors are read from each buffer dict per call: a cache of them could go stale,
        # and nn.Module's attribute lookup costs about a microsecond a name
        held = [m._buffers for m in self.members]
        first = self.members[0]
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        ys = cpu_ext.extension().uniform_gemv_group(
            flat, [b["qweight"] for b in held], [b["scales"] for b in held], [b["qzeros"] for b in held],
            held[0]["input_order"], self._bits, first.group_size)
        lead = x.shape[:-1]
        out = []
        for y, b, n in zip(ys, held, self._sizes, strict=True):
            y = y.to(x.dtype)
            bias = b["bias"]
            out.append((y if bias is None else y + bias.to(x.dtype)).view(*lead, n))
        return out


def select_path(layer, x: torch.Tensor) -> str:
    """The path ``layer(x)`` takes under the current backend."""
    backend = _backend
    if backend == "reference":
        return "reference"
    if x.device.type == "cpu":   # decoding on CPU is the hot case: decided first
        decoding = backend == "auto" and x.numel() <= DECODE_MAX_ROWS * x.shape[-1]
        if decoding and layer.cpu_gemv_fast():
            return "cpu-gemv"
        if (decoding or backend == "cpu-int4") and not layer.cpu_int4_reason():
            return "cpu-int4"
        if (decoding or backend == "cpu-gemv") and gemv_fits(layer) and cpu_ext.extension() is not None:
            return "cpu-gemv"
        if backend in ("auto", "cpu-dequant") and cpu_ext.extension() is not None:
            return "cpu-dequant"
        return "reference"
    if not x.is_cuda:
        return "reference"
    if backend in ("auto", "triton") and _triton_ready():
        return "triton"
    return "reference"


def half_weight_gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """``x · Wᵀ`` for one fp32 row ``x [..., K]`` and a float16/bfloat16 ``W [N, K]`` on CPU, each
    weight widened to fp32 in registers (the products of an fp32 copy of ``W``, half its bytes
    read); None where that path does not apply (more rows, other dtypes or devices, no compiler,
    the ``reference`` backend). torch's own half-precision GEMV is 2-3x slower at one row on CPU;
    from two rows up its bf16 GEMM wins, and callers keep their torch path there."""
    if (x.dtype != torch.float32 or x.device.type != "cpu" or weight.dtype not in (torch.float16, torch.bfloat16)
            or x.numel() != x.shape[-1] or _backend == "reference"):
        return None
    ext = cpu_ext.extension()
    if ext is None:
        return None
    return ext.half_gemv(x.reshape(1, -1), weight).view(*x.shape[:-1], weight.shape[0])


def uniform_linear(layer, x: torch.Tensor) -> torch.Tensor:
    path = select_path(layer, x)
    group = layer.shared_input
    if group is not None and group.path == path:
        return group.output(layer, x)
    if path == "cpu-int4":
        return cpu_int4.int4_linear(x, layer.cpu_int4_pack(), layer.bias)
    bias = layer._buffers["bias"]
    if path == "triton" and layer.input_order is not None:
        x = x.index_select(-1, layer.input_order)   # the held columns' order (the others: inside their call)
    if path == "triton":
        from . import triton_uniform

        return triton_uniform.uniform_linear(layer, x)
    if path == "cpu-gemv":   # the hot path of decoding: buffers read from their dict, as SharedInputGemv does
        held = layer._buffers
        flat = x.reshape(-1, x.shape[-1]).to(torch.float32)
        y = cpu_ext.extension().uniform_gemv(flat, held["qweight"], held["scales"], held["qzeros"],
                                             held["input_order"], layer.bits, layer.group_size).to(x.dtype)
        y = y if bias is None else y + bias.to(x.dtype)
        return y.view(*x.shape[:-1], layer.out_features)
    if path == "cpu-dequant":
        weight = cpu_ext.extension().dequantize_uniform(layer.qweight, layer.scales, layer.qzeros, layer.g_idx,
                                                        layer.bits, layer.in_features, max(layer.group_size, 1),
                                                        layer.input_order)
        weight = weight.to(x.dtype)
    else:
        weight = layer.dequantize(x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def ggml_linear(layer, x: torch.Tensor) -> torch.Tensor:
    """``x · Wᵀ (+ bias)`` of GGML block weights: decoding rows on CPU through the C++ affine GEMV on
    the layer's byte codes with a step and offset per sub-block (``layer.decoded()``); larger inputs
    on CPU through a weight computed from those codes for this call (the reference's arithmetic,
    without unpacking the blocks again); the ``reference`` backend and other devices dequantize the
    blocks."""
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    rows = x.numel() // max(x.shape[-1], 1)
    ext = None
    if x.device.type == "cpu" and rows <= DECODE_MAX_ROWS and _backend in ("auto", "cpu-gemv"):
        ext = cpu_ext.extension()
    if ext is None:
        if x.device.type == "cpu" and _backend in ("auto", "cpu-dequant"):
            codes, step, offset, _ = layer.decoded()
            zero_point = layer.type.zero is not None   # offset = step·z there: w = step·(q − z), as the reference
            weight = dequantize_codes(layer.type, codes, step, None if zero_point else offset).to(x.dtype)
        else:
            weight = layer.dequantize(x.dtype)
        return torch.nn.functional.linear(x, weight, bias)
    codes, step, offset, sub = layer.decoded()
    y = ext.affine_gemv(x.reshape(-1, layer.in_features).to(torch.float32), codes, step, offset, sub).to(x.dtype)
    y = y if bias is None else y + bias
    return y.view(*x.shape[:-1], layer.out_features)
