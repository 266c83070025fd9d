"""Triton kernels against the torch reference on the test device (CUDA where present, else the
CPU through Triton's interpreter), and the GPU build check.

Every output buffer is poisoned with NaN before the kernel runs, so an element a kernel forgets to
write fails the comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from llmpress.compress.quant.gptq import gptq_quantize
from llmpress.layers import QuantLinear

triton_uniform = pytest.importorskip("llmpress.kernels.triton_uniform")
if triton_uniform.triton is None:
    pytest.skip("triton is not installed", allow_module_level=True)

N, K = 40, 200        # neither a multiple of the kernels' blocks; groups of 64 and 128 are ragged
CASES = [(bits, group, act_order) for bits in (2, 3, 4, 8) for group in (32, 64, 128, -1)
         for act_order in ((False, True) if group > 0 else (False,))]


def _layer(bits, group, act_order, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g)
    X = torch.randn(3 * K, K, generator=g) * torch.linspace(0.1, 4, K)[torch.randperm(K, generator=g)]
    result = gptq_quantize(W, 2 * X.T @ X / X.shape[0], bits=bits, group_size=group, act_order=act_order)
    assert (result.g_idx is not None) == act_order
    return QuantLinear.from_quantized(result, None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(("bits", "group", "act_order"), CASES)
def test_triton_kernels_equal_the_reference(bits, group, act_order, dtype, device):
    layer = _layer(bits, group, act_order, seed=bits * 1000 + group).to(device)
    reference = layer.dequantize(torch.float32)

    dense = triton_uniform.dequantize(layer, dtype, out=torch.full((N, K), float("nan"), dtype=dtype, device=device))
    assert torch.equal(dense, reference.to(dtype))

    x = torch.randn(20, K).to(device, dtype)
    expected = x.double() @ reference.double().T
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -10      # fp32 accumulation, then the output dtype
    scale = expected.abs().max()
    y = triton_uniform.matmul(layer, x, out=torch.full((20, N), float("nan"), dtype=dtype, device=device))
    assert ((y.double() - expected).abs() <= tolerance * scale).all()
    for rows in (1, 3, 8):
        for config in ({"BLOCK_N": 32, "SPLIT_K": 1}, {"BLOCK_N": 64, "SPLIT_K": 4}):
            y = triton_uniform.gemv(layer, x[:rows], config=config)
            assert y.dtype == dtype
            assert ((y.double() - expected[:rows]).abs() <= tolerance * scale).all(), (rows, config)


def test_layers_the_fast_kernels_cannot_read_take_dequantize_and_matmul(device):
    """A group size that is not a power of two, and a g_idx whose groups are not runs of equal size:
    the GEMV and GEMM refuse them, and the layer's Triton path still equals the reference."""
    irregular = _layer(4, 48, False, seed=3).to(device)
    shuffled = _layer(4, 32, False, seed=4).to(device)
    g = torch.Generator().manual_seed(0)
    shuffled.g_idx = torch.randint(0, shuffled.n_groups, (K,), generator=g).to(device, torch.int32)
    for layer in (irregular, shuffled):
        assert not triton_uniform.fast_layout(layer)
        x = torch.randn(3, K).to(device)
        with pytest.raises(ValueError, match="power-of-two groups"):
            triton_uniform.gemv(layer, x)
        expected = x.double() @ layer.dequantize(torch.float32).double().T
        y = triton_uniform.uniform_linear(layer, x)
        assert ((y.double() - expected).abs() <= 1e-5 * expected.abs().max()).all()


def test_an_act_order_layer_is_repacked_once_in_group_order(device):
    layer = _layer(3, 64, True, seed=5).to(device)
    packed, order = triton_uniform.sorted_layout(layer)
    codes = triton_uniform.unpack_codes(layer.qweight, 3, K)
    assert torch.equal(triton_uniform.unpack_codes(packed, 3, K), codes[:, order])
    assert torch.equal(layer.g_idx[order].long(), torch.arange(K, device=device) // 64)
    again, _ = triton_uniform.sorted_layout(layer)
    assert again is packed   # kept on the layer


def test_gemv_rejects_what_it_cannot_hold(device):
    layer = _layer(4, 32, False, seed=0).to(device)
    with pytest.raises(ValueError, match="at most 8 rows"):
        triton_uniform.gemv(layer, torch.randn(9, K, device=device))


def test_kernels_compile_for_sm80_and_sm90():
    """A separate process without the interpreter: every Triton kernel variant to PTX for sm_80 and
    sm_90; the fp16/bf16 GEMM on tensor cores there."""
    from llmpress.kernels.compile_check import bcq_variants, triton_variants

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "llmpress.kernels.compile_check"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for capability in (80, 90):
        assert sum(line.startswith(f"triton sm_{capability} ") for line in lines) == len(triton_variants())
        assert sum(line.startswith(f"triton-bcq sm_{capability} ") for line in lines) == len(bcq_variants())


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 8, 64, 512])
def test_a_cuda_layer_takes_the_triton_path_and_equals_the_reference(rows, device):
    """On a GPU: ``auto`` takes Triton (GEMV, fused GEMM, dequantize-once and cuBLAS by rows), autotuned,
    and equals the dequantized reference."""
    from llmpress.kernels.dispatch import select_path

    layer = _layer(4, 128, True, seed=7).to(device)
    x = torch.randn(rows, K, device=device, dtype=torch.float16)
    expected = x.double() @ layer.dequantize(torch.float32).double().T
    assert select_path(layer, x) == "triton"
    y = layer(x)
    assert ((y.double() - expected).abs() <= 2 ** -9 * expected.abs().max()).all()
