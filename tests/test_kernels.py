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


@pytest.mark.parametrize(("in_f", "group", "act_order", "bits"), [
    (192, 64, False, 4), (192, -1, False, 4), (256, 32, True, 4), (576, 64, True, 4), (384, 128, False, 4),
    (192, 64, False, 3), (576, 64, True, 3), (192, 64, True, 2), (200, -1, False, 2),
    (576, 128, False, 4), (576, 128, True, 3),   # a ragged last group, padded with zero inputs
])
def test_cpu_int4_path_equals_the_reference(in_f, group, act_order, bits):
    layer = _layer(96, in_f, bits, group, act_order=act_order)
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
    assert "8-bit" in _layer(32, 128, 8, 64).cpu_int4_reason()
    assert "multiple of 16" in _layer(40, 128, 4, 64).cpu_int4_reason()
    assert "group size" in _layer(32, 96, 4, 48).cpu_int4_reason()
    layer = _layer(32, 128, 4, 64)
    assert select_path(layer, torch.randn(64, 128)) in ("cpu-dequant", "reference")   # prefill stays fp32
    with use_backend("reference"):
        assert select_path(layer, torch.randn(1, 128)) == "reference"
    with use_backend("cpu-int4"):
        assert select_path(layer, torch.randn(64, 128)) == "cpu-int4"
    with pytest.raises(ValueError, match="unknown kernel backend"):
        use_backend("fast").__enter__()


@pytest.mark.parametrize(("bits", "group", "act_order"), [(2, 64, False), (3, 64, True), (4, -1, False),
                                                       (8, 64, True), (3, 128, False)])
def test_prefill_dequantizes_exactly_the_reference_weight(bits, group, act_order, monkeypatch):
    from llmpress.kernels import cpu_ext

    layer = _layer(48, 576, bits, group, act_order=act_order)
    x = torch.randn(40, 576)
    with use_backend("reference"):
        expected = layer(x)
    if cpu_ext.extension() is not None:
        assert select_path(layer, x) == "cpu-dequant"
        assert torch.equal(layer(x), expected)     # the same weights to the bit, the same GEMM
    monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    assert select_path(layer, x) == "reference"


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


# -- binary-coded layers (ShiftAdd's BCQ, D²Quant's dual scales) ----------------------------------

def _binary_layers():
    from llmpress.compress.quant.bcq import bcq_quantize
    from llmpress.compress.quant.dsq import dsq_quantize
    from llmpress.layers import BCQLinear, DualScaleLinear

    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 100, generator=g)          # 40 rows = 8 row groups of 5; 100 inputs: ragged words
    x = torch.randn(800, 100, generator=g) * torch.linspace(0.2, 3, 100)
    h = x.T @ x / x.shape[0]
    layers = [BCQLinear.from_bcq(bcq_quantize(w, h, bits=bits), torch.randn(40, generator=g), torch.float32)
              for bits in (2, 3)]
    layers.append(DualScaleLinear.from_dsq(dsq_quantize(w, h, bits=2, group_size=32), None, torch.float32))
    return layers


def test_cpu_ext_kernels_equal_the_torch_oracle():
    from llmpress.formats.bcq import apot_value
    from llmpress.kernels import cpu_ext
    from llmpress.kernels.lut import lut_gemv_scaled
    from llmpress.layers import BCQLinear

    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip("no C++ compiler: the torch path serves (tested below)")
    for layer in _binary_layers():
        if isinstance(layer, BCQLinear):
            alpha, block = apot_value(layer.alpha_exp, layer.alpha_sign).float(), layer.col_block
        else:
            alpha, block = layer.scales.float(), layer.group_size
        planes = lut_gemv_scaled(torch.eye(100, dtype=torch.float64), layer.sign_bits, alpha.double(), block, 40).T
        torch.testing.assert_close(ext.dequantize(layer.sign_bits, alpha, block, 100).double(), planes,
                                   rtol=1e-6, atol=1e-6)
        for rows in (1, 3, 8):
            x = torch.randn(rows, 100)
            expected = lut_gemv_scaled(x.double(), layer.sign_bits, alpha.double(), block, 40)
            torch.testing.assert_close(ext.lut_gemv(x, layer.sign_bits, alpha, block).double(), expected,
                                       rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("built", [True, False])
def test_binary_coded_layers_equal_their_reference_on_every_path(built, monkeypatch):
    from llmpress.kernels import cpu_ext

    if not built:   # no compiler: the torch LUT and dequantizer serve
        monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    for layer in _binary_layers():
        for rows in (1, 5, 8, 24):   # the LUT GEMV up to 8 rows, a dequantized weight for the call above
            x = torch.randn(rows, 100)
            with use_backend("reference"):
                expected = layer(x)
            torch.testing.assert_close(expected, x @ layer.dequantize().T + (0 if layer.bias is None else layer.bias))
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_a_compressed_model_keeps_nothing_dense_after_a_prefill(tiny_model_factory, tmp_path):
    import llmpress

    def resident_bytes(model) -> int:   # every tensor a module holds: parameters, buffers, caches
        seen, total = set(), 0
        for module in model.modules():
            for value in vars(module).values():
                items = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else [value]
                for item in items:
                    tensors = vars(item).values() if hasattr(item, "__dataclass_fields__") else [item]
                    for t in tensors:
                        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
                            seen.add(t.data_ptr())
                            total += t.numel() * t.element_size()
        return total

    for recipe in ("shiftadd-w2", "gptq-w3-g64"):
        llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / recipe, nsamples=8, seqlen=32,
                          progress=False)
        model, _ = llmpress.load(tmp_path / recipe)
        dense, _ = llmpress.load(tiny_model_factory("llama"))
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 64)))            # prefill: the dequantize-per-call path
            model(torch.randint(0, 1000, (1, 1)))             # one decoded token: the kernels' packs
        # the decoder blocks (a rotation unties the head from the embeddings, which stay dense)
        assert resident_bytes(model.model.layers) < resident_bytes(dense.model.layers) / 2, recipe
