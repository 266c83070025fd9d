"""Build check without a GPU: compile every Triton kernel to PTX (and cubin) for sm_80 and sm_90,
and every CUDA source under ``kernels/csrc`` with nvcc when it is installed.

    python -m llmpress.kernels.compile_check            # prints one line per kernel and target

Run it in a process of its own: ``TRITON_INTERPRET`` must be unset for Triton to compile.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CSRC = Path(__file__).resolve().parent / "csrc"
TARGETS = (80, 90)

_LAYER = {"qweight_ptr": "*i32", "scales_ptr": "*fp16", "qzeros_ptr": "*i32", "g_idx_ptr": "*i32"}
_SCALARS = ("N", "K", "qw_stride", "s_stride", "qz_stride", "n_words", "nz_words", "group_size")


def _signatures(out_dtype: str) -> dict[str, dict[str, str]]:
    ints = dict.fromkeys(_SCALARS, "i32")
    return {
        "_dequantize_kernel": {"out_ptr": f"*{out_dtype}", **_LAYER, **ints},
        "_matmul_kernel": {"y_ptr": f"*{out_dtype}", "x_ptr": f"*{out_dtype}", **_LAYER, "M": "i32",
                           "N": "i32", "K": "i32", "x_stride": "i32", **{k: "i32" for k in _SCALARS[2:]}},
        "_gemv_kernel": {"partial_ptr": "*fp32", "x_ptr": f"*{out_dtype}", **_LAYER, "M": "i32", "N": "i32",
                         "K": "i32", "x_stride": "i32", **{k: "i32" for k in _SCALARS[2:]}, "k_per_split": "i32",
                         "p_stride_split": "i32", "p_stride_m": "i32"},
    }


_BLOCKS = {
    "_dequantize_kernel": {"BLOCK_N": 32, "BLOCK_K": 64},
    "_matmul_kernel": {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 32},
    "_gemv_kernel": {"BLOCK_M": 8, "BLOCK_N": 32, "BLOCK_K": 16},
}


def triton_variants() -> list[tuple[str, dict]]:
    """(kernel, constexprs): every bit width with act-order groups, plus per-row and plain groups at 4 bits."""
    variants = []
    for kernel in _BLOCKS:
        for bits in (2, 3, 4, 8):
            variants.append((kernel, {"BITS": bits, "HAS_G_IDX": True, "PER_ROW": False}))
        variants.append((kernel, {"BITS": 4, "HAS_G_IDX": False, "PER_ROW": True}))
        variants.append((kernel, {"BITS": 4, "HAS_G_IDX": False, "PER_ROW": False}))
    return variants


_BCQ_SIGNATURES = {
    "_lut_build": {"x_ptr": "*fp16", "lut_ptr": "*fp32", "K": "i32", "G": "i32", "x_stride": "i32"},
    "_lut_gemv": {"lut_ptr": "*fp32", "bits_ptr": "*i32", "alpha_ptr": "*fp32", "y_ptr": "*fp32",
                  **dict.fromkeys(("M", "N", "G", "n_words", "rows_per", "groups_per_block", "n_blocks",
                                   "n_row_groups"), "i32")},
}


def bcq_variants() -> list[tuple[str, dict]]:
    """The binary-coded LUT kernels: the table builder, and the GEMV for 1-4 bit-planes."""
    return [("_lut_build", {})] + [("_lut_gemv", {"Q": q, "BLOCK_M": 8, "BLOCK_N": 64}) for q in (1, 2, 3, 4)]


def compile_bcq(capability: int, kernel: str, constexprs: dict) -> int:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_bcq

    signature = {**_BCQ_SIGNATURES[kernel], **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=getattr(triton_bcq, kernel), signature=signature, constexprs=constexprs)
    return len(triton_compile(src, target=GPUTarget("cuda", capability, 32)).asm["ptx"])


def compile_triton(capability: int, kernel: str, flags: dict) -> int:
    """Compile one kernel variant; returns the size of its PTX."""
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_uniform

    constexprs = {**flags, **_BLOCKS[kernel]}
    signature = {**_signatures("fp16")[kernel], **dict.fromkeys(constexprs, "constexpr")}
    src = ASTSource(fn=getattr(triton_uniform, kernel), signature=signature, constexprs=constexprs)
    compiled = triton_compile(src, target=GPUTarget("cuda", capability, 32))
    return len(compiled.asm["ptx"])


def compile_cuda(capability: int, source: Path) -> str | None:
    """nvcc-compile ``source`` for ``sm_<capability>``; None where nvcc is absent."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / (source.stem + ".o")
        cmd = [nvcc, "-c", str(source), "-o", str(out), "-O3", "-std=c++17",
               f"-gencode=arch=compute_{capability},code=sm_{capability}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {source.name} for sm_{capability}:\n{proc.stderr}")
        return f"{out.stat().st_size} bytes"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton-only", action="store_true")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET"):
        print("unset TRITON_INTERPRET: the interpreter does not compile", file=sys.stderr)
        return 2
    for capability in TARGETS:
        for kernel, flags in triton_variants():
            size = compile_triton(capability, kernel, flags)
            print(f"triton sm_{capability} {kernel} {flags}: ptx {size} chars", flush=True)
        for kernel, constexprs in bcq_variants():
            size = compile_bcq(capability, kernel, constexprs)
            print(f"triton-bcq sm_{capability} {kernel} {constexprs}: ptx {size} chars", flush=True)
    if not args.triton_only:
        for source in sorted(CSRC.glob("*.cu")):
            for capability in TARGETS:
                result = compile_cuda(capability, source)
                print(f"nvcc sm_{capability} {source.name}: " + (result or "skipped: nvcc is not installed"), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
