"""Build check without a GPU: compile every Triton kernel to PTX (and cubin) for sm_80 and sm_90.

    python -m llmpress.kernels.compile_check            # prints one line per kernel and target

Run it in a process of its own: ``TRITON_INTERPRET`` must be unset for Triton to compile.
"""

from __future__ import annotations

import argparse
import os
import sys

TARGETS = (80, 90)

_LAYER = {"qweight_ptr": "*i32", "scales_ptr": "*fp16", "qzeros_ptr": "*i32"}
_STRIDES = ("qw_stride", "s_stride", "qz_stride", "n_words", "nz_words")


def _signature(kernel: str, dtype: str) -> dict[str, str]:
    ints = dict.fromkeys(_STRIDES, "i32")
    if kernel == "_dequantize_kernel":
        return {"out_ptr": f"*{dtype}", **_LAYER, "g_idx_ptr": "*i32", "N": "i32", "K": "i32", **ints,
                "group_size": "i32"}
    if kernel == "_gemv_kernel":
        return {"y_ptr": "*fp32", "x_ptr": f"*{dtype}", **_LAYER, "M": "i32", "N": "i32", "K": "i32",
                "x_stride": "i32", **ints}
    return {"y_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", **_LAYER, "M": "i32", "N": "i32", "K": "i32",
            "m_bucket": "i32", "x_stride": "i32", **ints}


def triton_variants() -> list[tuple[str, str, dict]]:
    """(kernel, activation dtype, constexprs): every bit width on groups of 64, per-row and groups
    of 16 at 4 bits; the GEMM in fp16 (tensor cores) and fp32 (IEEE); the dequantizer with and
    without act-order."""
    variants = []
    for bits in (2, 3, 4, 8):
        for dtype, ieee in (("fp16", False), ("fp32", True)):
            variants.append(("_matmul_kernel", dtype, {"BITS": bits, "GROUP": 64, "PER_ROW": False, "IEEE": ieee,
                                                       "BLOCK_K": 64, "BLOCK_M": 64, "BLOCK_N": 64}))
        variants.append(("_gemv_kernel", "fp16", {"BITS": bits, "GROUP": 64, "PER_ROW": False, "BLOCK_M": 1,
                                                  "BLOCK_K": 64, "BLOCK_N": 64, "SPLIT_K": 4}))
        variants.append(("_dequantize_kernel", "fp16", {"BITS": bits, "HAS_G_IDX": True, "PER_ROW": False,
                                                        "BLOCK_N": 32, "BLOCK_K": 64}))
    for group, per_row in ((16, False), (0, True)):
        variants.append(("_gemv_kernel", "fp16", {"BITS": 4, "GROUP": group, "PER_ROW": per_row, "BLOCK_M": 8,
                                                  "BLOCK_K": 16, "BLOCK_N": 32, "SPLIT_K": 1}))
        variants.append(("_matmul_kernel", "bf16", {"BITS": 4, "GROUP": group, "PER_ROW": per_row, "IEEE": False,
                                                    "BLOCK_K": 16, "BLOCK_M": 128, "BLOCK_N": 128}))
    variants.append(("_dequantize_kernel", "bf16", {"BITS": 4, "HAS_G_IDX": False, "PER_ROW": True,
                                                    "BLOCK_N": 32, "BLOCK_K": 64}))
    return variants


_BCQ_SIGNATURES = {
    "_lut_build": {"x_ptr": "*fp16", "lut_ptr": "*fp32", "K": "i32", "G": "i32", "x_stride": "i32"},
    "_lut_gemv": {"lut_ptr": "*fp32", "bits_ptr": "*i32", "alpha_ptr": "*fp32", "y_ptr": "*fp32",
                  **dict.fromkeys(("M", "N", "G", "n_words", "rows_per", "n_blocks", "n_row_groups"), "i32")},
}


def bcq_variants() -> list[tuple[str, dict]]:
    """The binary-coded LUT kernels: the table builder, and the GEMV for 1-4 bit-planes (scales per
    8 columns, the paper's; one variant per 32 and with split-K atomics)."""
    return [("_lut_build", {})] + [
        ("_lut_gemv", {"Q": q, "GROUPS_PER_BLOCK": gpb, "BLOCK_M": 8, "BLOCK_N": 64, "SPLIT_K": split})
        for q, gpb, split in ((1, 1, 1), (2, 1, 4), (3, 1, 4), (4, 1, 1), (2, 4, 2))]


def compile_bcq(capability: int, kernel: str, constexprs: dict) -> int:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_bcq

    signature = {**_BCQ_SIGNATURES[kernel], **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=getattr(triton_bcq, kernel), signature=signature, constexprs=constexprs)
    return len(triton_compile(src, target=GPUTarget("cuda", capability, 32)).asm["ptx"])


def compile_triton(capability: int, kernel: str, dtype: str, constexprs: dict) -> int:
    """Compile one kernel variant; returns the size of its PTX."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_uniform

    signature = {**_signature(kernel, dtype), **dict.fromkeys(constexprs, "constexpr")}
    # what a launch on aligned tensors specializes to (pointers, strides and word counts divisible
    # by 16): the vector loads a real run compiles
    names = list(signature)
    aligned = [n for n in names if n.endswith("_ptr") or n in ("x_stride", *_STRIDES)]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    src = ASTSource(fn=getattr(triton_uniform, kernel), signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton_compile(src, target=GPUTarget("cuda", capability, 32))
    return len(compiled.asm["ptx"])


def main() -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    for capability in TARGETS:
        for kernel, dtype, constexprs in triton_variants():
            size = compile_triton(capability, kernel, dtype, constexprs)
            print(f"triton sm_{capability} {kernel} {dtype} {constexprs}: ptx {size} chars", flush=True)
        for kernel, constexprs in bcq_variants():
            size = compile_bcq(capability, kernel, constexprs)
            print(f"triton-bcq sm_{capability} {kernel} {constexprs}: ptx {size} chars", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
