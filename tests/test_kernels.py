"""Kernels against the torch reference: the CPU int4 path, the dispatch rules."""

from __future__ import annotations

import pytest
import torch

from llmpress.compress.quant.gptq import gptq_quantize
from llmpress.kernels import cpu_int4
from llmpress.kernels.dispatch import select_path, use_backend
from llmpress.layers import QuantLinear


def _layer(out_f, in_f, bits, group, *, act_order=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out_f, in_f, generator=g)
    X = torch.randn(4 * in_f, in_f, generator=g) * torch.linspace(0.2, 3, in_f)
    result = gptq_quantize(W, 2 * X.T @ X / X.shape[0], bits=bits, group_size=group, act_order=act_order)
    return QuantLinear.from_quantized(result, torch.randn(out_f, generator=g) if bias else None, torch.float32)


@pytest.mark.parametrize(("in_f", "group", "act_order"), [
    (192, 64, False), (192, -1, False), (256, 32, True), (576, 64, True), (384, 128, False),
])
def test_cpu_int4_path_equals_the_reference(in_f, group, act_order):
    layer = _layer(96, in_f, 4, group, act_order=act_order)
    assert layer.cpu_int4_reason() is None
    pack = layer.cpu_int4_pack()
    for rows in (1, 3, 8):
        x = torch.randn(rows, in_f)
        with use_backend("reference"):
            expected = layer(x)
        # torch's kernel with fp32 activations: the same function to fp32 rounding
        exact = cpu_int4.int4_linear(x, pack, layer.bias, compute_dtype=torch.float32)
        assert torch.allclose(exact, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
        # the bf16 fast path the dispatcher takes for decoding: bf16 accuracy, same layout
        assert select_path(layer, x) == "cpu-int4"
        fast = layer(x)
        assert (fast - expected).abs().max() <= 2 ** -6 * expected.abs().max()


def test_dispatch_falls_back_where_the_int4_kernel_does_not_fit():
    assert "3-bit" in _layer(32, 128, 3, 64).cpu_int4_reason()
    assert "multiple of 16" in _layer(40, 128, 4, 64).cpu_int4_reason()
    assert "group size" in _layer(32, 96, 4, 64).cpu_int4_reason()          # ragged group
    layer = _layer(32, 128, 4, 64)
    assert select_path(layer, torch.randn(64, 128)) == "reference"           # prefill stays fp32
    with use_backend("reference"):
        assert select_path(layer, torch.randn(1, 128)) == "reference"
    with use_backend("cpu-int4"):
        assert select_path(layer, torch.randn(64, 128)) == "cpu-int4"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        use_backend("fast").__enter__()


def test_int4_pack_is_rebuilt_when_the_tensors_change():
    layer = _layer(32, 128, 4, 64)
    first = layer.cpu_int4_pack()
    assert layer.cpu_int4_pack() is first
    layer.scales.mul_(2)
    assert layer.cpu_int4_pack() is not first
    x = torch.randn(1, 128)
    with use_backend("reference"):
        expected = layer(x)
    exact = cpu_int4.int4_linear(x, layer.cpu_int4_pack(), layer.bias, compute_dtype=torch.float32)
    assert torch.allclose(exact, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert cpu_int4.pack_for_cpu(layer).group_size == 64
