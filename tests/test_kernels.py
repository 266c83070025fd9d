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
    for rows in (1, 3, 8):
        x = torch.randn(rows, in_f)
        with use_backend("reference"):
            expected = layer(x)
        # torch's kernel with fp32 activations: the same function to fp32 rounding
        exact = cpu_int4.int4_linear(x, cpu_int4.pack_for_cpu(layer, torch.float32), layer.bias)
        assert torch.allclose(exact, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
        # the bf16 fast path: bf16 accuracy, same layout
        with use_backend("cpu-int4"):
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


@pytest.mark.parametrize(("bits", "group"), [(8, -1), (8, 64), (3, 48), (4, 40), (2, -1)])
def test_the_cpp_gemv_decodes_the_layers_the_int4_kernel_cannot_take(bits, group):
    from llmpress.kernels import cpu_ext

    if cpu_ext.extension() is None:
        pytest.skip("no C++ compiler: these layers decode through the dequantizer")
    layer = _layer(40, 240, bits, group)     # 40 outputs: not a multiple of 16 either
    assert layer.cpu_int4_reason() is not None
    for rows in (1, 5):
        x = torch.randn(2, rows, 240)
        assert select_path(layer, x) == "cpu-gemv"
        with use_backend("reference"):
            expected = layer(x)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_int4_pack_is_rebuilt_when_the_tensors_change():
    layer = _layer(32, 128, 4, 64)
    first = layer.cpu_int4_pack()
    assert layer.cpu_int4_pack() is first
    layer.scales.mul_(2)
    assert layer.cpu_int4_pack() is not first
    x = torch.randn(1, 128)
    with use_backend("reference"):
        expected = layer(x)
    exact = cpu_int4.int4_linear(x, cpu_int4.pack_for_cpu(layer, torch.float32), layer.bias)
    with use_backend("cpu-int4"):
        assert torch.equal(layer(x), cpu_int4.int4_linear(x, layer.cpu_int4_pack(), layer.bias))
    assert torch.allclose(exact, expected, rtol=1e-5, atol=1e-5 * expected.abs().max())
    assert cpu_int4.pack_for_cpu(layer).group_size == 64


def _layers_reading_one_input(in_f, specs, *, act_order):
    """Linears quantized against one input's statistics (as q/k/v are): equal act-order groups."""
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4 * in_f, in_f, generator=g) * torch.linspace(0.2, 3, in_f)
    layers = []
    for out_f, bits, bias in specs:
        result = gptq_quantize(torch.randn(out_f, in_f, generator=g), 2 * X.T @ X / X.shape[0], bits=bits,
                               group_size=64, act_order=act_order)
        layers.append(QuantLinear.from_quantized(result, torch.randn(out_f, generator=g) if bias else None,
                                                 torch.float32))
    return layers


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_reading_one_input_share_one_gemm_with_the_same_results(act_order):
    with use_backend("cpu-int4"):   # the path shared GEMMs serve (auto may take the C++ GEMV instead)
        _check_shared_gemm(act_order)


def _check_shared_gemm(act_order):
    members = _layers_reading_one_input(192, [(96, 4, True), (32, 3, False), (48, 2, True)], act_order=act_order)
    x = torch.randn(1, 2, 192)
    alone = [m(x) for m in members]
    gemm = cpu_int4.SharedInputGemm(members)
    for m in members:
        m.shared_input = gemm
    together = [m(x) for m in members]       # the first call computes all three
    for a, b in zip(alone, together):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-3 * float(a.abs().max()))
    # a member called with another tensor (or the same one changed in place) computes its own
    other = torch.randn(1, 2, 192)
    torch.testing.assert_close(members[1](other), cpu_int4.int4_linear(other, members[1].cpu_int4_pack(), None),
                               rtol=1e-3, atol=1e-3)
    members[0](x)
    x.mul_(2)
    torch.testing.assert_close(members[2](x), 2 * alone[2] - members[2].bias, rtol=2e-2, atol=2e-2)
    # inputs read differently cannot share a GEMM
    assert not cpu_int4.can_share_input([members[0], _layer(32, 192, 4, 32)])


def test_a_loaded_model_links_the_linears_that_read_one_input(tiny_model_factory, tmp_path):
    import llmpress

    llmpress.compress(tiny_model_factory("llama"), "gptq-w4-g64", out=tmp_path / "w4", nsamples=8, seqlen=32,
                      progress=False)
    model, _ = llmpress.load(tmp_path / "w4")
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
        assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
        assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        with use_backend("reference"):
            expected = model(ids).logits
        fast = model(ids).logits    # 12 rows: a decoding path, q/k/v and gate/up as one call each
    assert (fast - expected).abs().max() <= 2 ** -5 * expected.abs().max()


@pytest.mark.parametrize(("dtype", "head", "stored"), [("float16", "auto", torch.float16),
                                                     ("float32", "bfloat16", torch.bfloat16)])
def test_a_half_precision_head_stays_half_and_computes_like_its_upcast(tiny_model_factory, tmp_path, dtype, head,
                                                                      stored):
    import json

    import llmpress
    from llmpress.compress.recipe import load_recipe
    from llmpress.layers.stored_dense import StoredDtypeEmbedding, StoredDtypeLinear

    recipe = load_recipe("rtn-w4-g64").model_copy(update={"head": head})
    llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / "q", progress=False, dtype=dtype)
    model, _ = llmpress.load(tmp_path / "q")
    embed, head_module = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, StoredDtypeEmbedding) and isinstance(head_module, StoredDtypeLinear)
    assert embed.weight.dtype == stored and head_module.weight is embed.weight    # still tied, one tensor
    assert model.model.norm.weight.dtype == torch.float32 and model.dtype == torch.float32   # what it computes in
    if head != "auto":
        report = json.loads((tmp_path / "q" / "llmpress-report.json").read_text())["summary"]
        assert report["embedding and head stored as"] == head and report["dense tensors stored as"] == dtype
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        upcast = hidden @ embed.weight.float().T
        assert torch.equal(head_module(hidden), upcast)            # prefill: fp32 on the stored weight
        decode = head_module(hidden[:, -1:])                       # one row: the C++ GEMV, fp32 products
        assert (decode - upcast[:, -1:]).abs().max() <= 1e-5 * upcast.abs().max()
        few = head_module(hidden[:, -3:])                          # a few rows: torch's half-precision GEMM
        assert (few - upcast[:, -3:]).abs().max() <= 1e-2 * upcast.abs().max()
        assert model(ids).logits.dtype == torch.float32


@pytest.mark.parametrize("arch", ["llama", "qwen2"])   # a tied head, and (Qwen2 here) an untied one
def test_an_int8_head_computes_as_its_dequantized_table_and_exports_as_it(tiny_model_factory, tmp_path, arch):
    import json

    from transformers import AutoModelForCausalLM

    import llmpress
    from llmpress.compress.recipe import load_recipe
    from llmpress.formats.int8_rows import dequantize_rows, quantize_rows
    from llmpress.io.export import export
    from llmpress.layers.stored_dense import Int8RowsEmbedding, Int8RowsLinear

    source = tiny_model_factory(arch)
    recipe = load_recipe("rtn-w4-g64").model_copy(update={"head": "int8"})
    llmpress.compress(source, recipe, out=tmp_path / "q", progress=False)
    model, _ = llmpress.load(tmp_path / "q")
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, Int8RowsEmbedding) and isinstance(head, Int8RowsLinear)
    assert embed.weight.dtype == torch.int8 and (head.weight is embed.weight) == model.config.tie_word_embeddings
    dense = AutoModelForCausalLM.from_pretrained(source)
    codes, scale = quantize_rows(dense.get_output_embeddings().weight)
    assert torch.equal(head.weight, codes) and torch.equal(head.weight_scale, scale)
    table = dequantize_rows(codes, scale)
    assert (table - dense.get_output_embeddings().weight).abs().max() <= scale.max() / 2 + 1e-7   # half a step
    report = json.loads((tmp_path / "q" / "llmpress-report.json").read_text())["summary"]
    assert report["embedding and head stored as"] == "int8"
    ids = torch.randint(0, 1000, (1, 40))
    with torch.no_grad():
        assert torch.equal(embed(ids), embed.dequantize()[ids])
        hidden = model.model(ids).last_hidden_state
        expected = hidden @ head.dequantize().T
        assert torch.equal(head(hidden), expected)                 # prefill: fp32 on the dequantized table
        decode = head(hidden[:, -1:])                              # one row: the C++ int8 GEMV where built
        assert (decode - expected[:, -1:]).abs().max() <= 1e-5 * expected.abs().max()
        with use_backend("reference"):   # the dequantized table (a one-row GEMM: its own summation order)
            torch.testing.assert_close(head(hidden[:, -1:]), expected[:, -1:], rtol=1e-5, atol=1e-6)
        logits = model(ids).logits
    # the dense export holds the tables the codes stand for; transformers loads it as it is
    export(tmp_path / "q", tmp_path / "dense", "dense", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.equal(plain.get_input_embeddings().weight, embed.dequantize())
    with torch.no_grad():
        assert (plain(ids).logits - logits).abs().max() <= 1e-3 * logits.abs().max()


@pytest.mark.parametrize("rows", [1, 3])
def test_the_int8_rows_gemv_equals_the_dequantized_table_on_every_path(lut_ext, rows):
    from llmpress.formats.int8_rows import dequantize_rows, quantize_rows

    g = torch.Generator().manual_seed(5)
    codes, scale = quantize_rows(torch.randn(203, 200, generator=g))   # rows past whole fours, K past 16s
    x = torch.randn(rows, 200, generator=g)
    expected = (x.double() @ dequantize_rows(codes, scale).double().T).float()
    y = lut_ext.int8_rows_gemv(x, codes, scale)
    assert (y - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_an_int8_head_is_refused_where_the_embedding_computes_more_than_a_lookup(tiny_model_factory, tmp_path):
    import llmpress
    from llmpress.compress.recipe import load_recipe
    from llmpress.errors import RecipeError

    recipe = load_recipe("rtn-w4-g64").model_copy(update={"head": "int8"})
    with pytest.raises(RecipeError, match="Gemma3TextScaledWordEmbedding"):   # it scales by √hidden
        llmpress.compress(tiny_model_factory("gemma3"), recipe, out=tmp_path / "q", progress=False)
    assert not (tmp_path / "q").exists()


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


def test_the_cpp_kernels_build_where_a_compiler_is_present():
    """The kernel tests skip where nothing can be built: a source that does not compile must fail here
    instead of skipping them."""
    import shutil

    from torch.utils.cpp_extension import is_ninja_available

    from llmpress.kernels import cpu_ext

    if shutil.which("c++") is None or not is_ninja_available():
        pytest.skip("no C++ compiler or no ninja on PATH: torch's extension builder needs both")
    assert cpu_ext.extension() is not None


@pytest.fixture(params=["vector", "portable"])
def lut_ext(request):
    """The C++ module, on its vector path (AVX-512 where the CPU has it) and on its portable loops."""
    from llmpress.kernels import cpu_ext

    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip("no C++ compiler: the torch path serves (tested below)")
    ext.use_portable_kernels(request.param == "portable")
    yield ext
    ext.use_portable_kernels(False)


def test_cpu_ext_kernels_equal_the_torch_oracle(lut_ext):
    from llmpress.formats.bcq import apot_value
    from llmpress.kernels.lut import lut_gemv_scaled
    from llmpress.layers import BCQLinear

    ext = lut_ext
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


@pytest.mark.parametrize("planes,col_block,row_groups", [(2, 8, 2), (3, 8, 2), (1, 40, 2), (2, 64, 88), (2, 8, 8)])
def test_cpu_lut_gemv_equals_the_torch_lut_over_whole_and_ragged_row_tiles(planes, col_block, row_groups, lut_ext):
    """The C++ LUT GEMV's AVX-512 path takes 16 rows at a time, inside one row group where groups
    have 16 rows or more: row groups of 44 rows end in a partial tile, row groups of 11 rows or of
    one row (a scale per row) are read lane by lane; K = 200 ends in a partial word of sign bits,
    five rows span two passes over the bits."""
    from llmpress.kernels.lut import lut_gemv_scaled

    ext = lut_ext
    g = torch.Generator().manual_seed(planes * 100 + col_block)
    n, k = 88, 200
    sign_bits = torch.randint(-2**31, 2**31 - 1, (planes, n, 7), dtype=torch.int32, generator=g)
    alpha = torch.rand(planes, row_groups, -(-k // col_block), generator=g) + 0.1
    for rows in (1, 5):
        x = torch.randn(rows, k, generator=g)
        expected = lut_gemv_scaled(x.double(), sign_bits, alpha.double(), col_block, n)
        torch.testing.assert_close(ext.lut_gemv(x, sign_bits, alpha, col_block).double(), expected,
                                   rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("built", [True, False])
def test_binary_coded_layers_equal_their_reference_on_every_path(built, monkeypatch):
    from llmpress.kernels import cpu_ext

    if not built:   # no compiler: the torch LUT and dequantizer serve
        monkeypatch.setattr(cpu_ext, "extension", lambda: None)
    for layer in _binary_layers():
        # the LUT GEMV up to 4 or 16 rows (portable or vector C++ path), a dequantized weight above
        for rows in (1, 4, 5, 16, 17, 24):
            x = torch.randn(rows, 100)
            with use_backend("reference"):
                expected = layer(x)
            torch.testing.assert_close(expected, x @ layer.dequantize().T + (0 if layer.bias is None else layer.bias))
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_a_compressed_model_keeps_nothing_dense_after_a_prefill(tiny_model_factory, tmp_path):
    import llmpress
    from llmpress.compress.recipe import load_recipe
    from llmpress.layers.memory import resident_bytes
    from llmpress.layers.stored_dense import StoredDtypeLinear

    mlp_dense = load_recipe("gptq-w3-g64").model_copy(update={"name": "gptq-w3-attention-only"})
    mlp_dense.stages[0].ignore = ["mlp"]   # the MLP linears stay dense, stored in fp16
    for recipe in ("shiftadd-w2", "gptq-w3-g64", "svdllm-30", mlp_dense):
        name = recipe if isinstance(recipe, str) else recipe.name
        llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / name, nsamples=8, seqlen=32,
                          progress=False, dtype="float16")
        recipe = name
        model, _ = llmpress.load(tmp_path / recipe)
        dense, _ = llmpress.load(tiny_model_factory("llama"))
        with torch.no_grad():
            model(torch.randint(0, 1000, (1, 64)))            # prefill: the dequantize-per-call path
            model(torch.randint(0, 1000, (1, 1)))             # one decoded token: the kernels' packs
        # the decoder blocks (a rotation unties the head from the embeddings, which stay dense)
        assert resident_bytes(model.model.layers) < resident_bytes(dense.model.layers) / 2, recipe
        # the whole model: the fp16 embedding of this tiny model is most of its folder, and it is
        # held as stored, not upcast to fp32
        on_disk = sum(p.stat().st_size for p in (tmp_path / recipe).glob("*.safetensors"))
        assert resident_bytes(model) < 1.1 * on_disk, recipe
        if recipe == "gptq-w3-attention-only":   # the linears left dense are held as stored too
            mlp = model.model.layers[0].mlp
            assert isinstance(mlp.down_proj, StoredDtypeLinear) and mlp.down_proj.weight.dtype == torch.float16


def _fast_gemv_or_skip(layer):
    from llmpress.kernels import cpu_ext

    if cpu_ext.extension() is None or not cpu_ext.uniform_gemv_fast(layer.bits, layer.in_features, layer.group_size):
        pytest.skip("this CPU has no AVX512-VBMI/-BF16 (or no compiler): the int4 path decodes these layers")


@pytest.mark.parametrize("act_order", [False, True])
def test_linears_reading_one_input_share_one_gemv_call_with_identical_results(act_order):
    from llmpress.kernels import cpu_ext
    from llmpress.kernels.dispatch import SharedInputGemv, gemv_can_share_input

    # widths 200 and 136 outputs: row tiles of 4 and a rest, split across threads mid-layer
    members = _layers_reading_one_input(576, [(200, 4, True), (36, 3, False), (136, 2, True)], act_order=act_order)
    if act_order:
        assert all(m.hold_in_group_order() for m in members)
    _fast_gemv_or_skip(members[0])
    assert gemv_can_share_input(members)
    x = torch.randn(1, 3, 576)
    alone = [m(x) for m in members]
    group = SharedInputGemv(members)
    for m in members:
        m.shared_input = group
    together = [m(x) for m in members]   # the first call computes all three, in one kernel call
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a, b)   # the same kernel on the same prepared input: bit for bit
    ext = cpu_ext.extension()
    ext.use_portable_kernels(True)   # the operator's per-layer fallback where the AVX-512 path is absent
    try:
        flat = x.reshape(-1, 576)
        ys = ext.uniform_gemv_group(flat, [m.qweight for m in members], [m.scales for m in members],
                                    [m.qzeros for m in members], members[0].input_order, [m.bits for m in members], 64)
        for y, m in zip(ys, members, strict=True):
            torch.testing.assert_close(y, ext.uniform_gemv(flat, m.qweight, m.scales, m.qzeros, m.input_order, m.bits, 64))
    finally:
        ext.use_portable_kernels(False)
    with use_backend("reference"):
        for m, b in zip(members, together, strict=True):
            expected = m(x)
            assert (b - expected).abs().max() <= 2 ** -7 * expected.abs().max()
    # inputs read differently (another group size) cannot share a call
    assert not gemv_can_share_input([members[0], _layer(32, 576, 4, 128)])


@pytest.mark.parametrize(("in_f", "group", "act_order", "bits"), [
    (192, 64, False, 4), (192, -1, False, 3), (576, 128, False, 2),   # per row; a ragged last group
    (136, 64, False, 3),                                              # 8 columns past the last chunk of 64
    (576, 64, True, 3), (576, 128, True, 4), (256, 64, True, 2),      # act-order, held in group order
])
def test_the_cpp_gemv_fast_path_equals_the_reference(in_f, group, act_order, bits):
    layer = _layer(42, in_f, bits, group, act_order=act_order)   # 42 outputs: tiles of 4 rows and a rest
    if act_order:
        assert layer.hold_in_group_order() and layer.g_idx is None
    _fast_gemv_or_skip(layer)
    for rows in (1, 3, 9):   # the kernel serves decoding rows two at a time
        x = torch.randn(rows, in_f)
        with use_backend("reference"):
            expected = layer(x)
        assert select_path(layer, x) == "cpu-gemv"
        # bf16 inputs (as torch's int4 path), exact codes and fp32 scales and sums
        assert (layer(x) - expected).abs().max() <= 2 ** -7 * expected.abs().max()


def test_an_act_order_layer_held_in_group_order_computes_and_saves_as_stored():
    from llmpress.kernels import cpu_ext

    layer = _layer(48, 576, 3, 64, act_order=True)
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    weight = layer.dequantize()
    x, rows = torch.randn(1, 576), torch.randn(40, 576)
    with use_backend("reference"):
        expected, expected_rows = layer(x), layer(rows)
    assert layer.hold_in_group_order()
    assert layer.input_order is not None and layer.g_idx is None and not layer.hold_in_group_order()
    assert torch.equal(layer.dequantize(), weight)
    state = layer.state_dict()                     # the stored layout, to the bit
    assert state.keys() == stored.keys() and all(torch.equal(state[k], stored[k]) for k in stored)
    assert all(torch.equal(v, stored[k]) for k, v in layer.in_stored_order().state_dict().items())
    with use_backend("reference"):
        assert torch.equal(layer(x), expected)
    if cpu_ext.extension() is not None:   # prefill: the weight written back in the stored order
        assert select_path(layer, rows) == "cpu-dequant"
        assert torch.equal(layer(rows), expected_rows)
    with use_backend("cpu-int4"):         # torch's int4 pack of the held layer: the same permuted input
        assert (layer(x) - expected).abs().max() <= 2 ** -6 * expected.abs().max()
    layer.load_state_dict(stored)         # loading takes the stored layout back
    assert layer.input_order is None and torch.equal(layer.g_idx, stored["g_idx"])
    with use_backend("reference"):
        assert torch.equal(layer(x), expected)


def test_a_loaded_act_order_model_holds_its_codes_once_and_exports_as_stored(tiny_model_factory, tmp_path):
    import llmpress
    from llmpress.layers.memory import resident_bytes

    llmpress.compress(tiny_model_factory("llama"), "gptq-w3-g64", out=tmp_path / "w3", nsamples=8, seqlen=32,
                      progress=False, settings=["static_groups=false"])
    model, _ = llmpress.load(tmp_path / "w3")
    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    _fast_gemv_or_skip(linears[0])
    # act-order with dynamic groups: the layers of several groups are held in group order
    assert all(m.input_order is not None for m in linears if m.n_groups > 1)
    assert all(m.cpu_gemv_fast() for m in linears)
    stored_bytes = sum(t.nbytes for m in linears for t in m.in_stored_order().state_dict().values())
    with torch.no_grad():
        for _ in range(2):
            model(torch.randint(0, 1000, (1, 1)))   # decoding rows: the C++ GEMV on the held codes
    held = resident_bytes(torch.nn.ModuleList(linears))
    assert held <= 1.1 * stored_bytes                        # no int4 copy beside the codes
    # what the model saves (state_dict) and exports (in_stored_order) is the folder's layout, to the bit
    from safetensors.torch import load_file

    stored = {}
    for f in (tmp_path / "w3").glob("*.safetensors"):
        stored |= load_file(f)
    state = model.state_dict()
    name = "model.layers.0.mlp.down_proj"
    for key in ("qweight", "g_idx", "qzeros", "scales"):
        assert torch.equal(state[f"{name}.{key}"], stored[f"{name}.{key}"])
        assert torch.equal(getattr(model.get_submodule(name).in_stored_order(), key), stored[f"{name}.{key}"])
