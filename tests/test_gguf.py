"""GGML grids and the GGUF export: the bytes are llama.cpp's, the weights are what llmpress measured."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import llmpress
from llmpress.cli import app
from llmpress.compress.quant.ggml_grid import FixedGGMLGrid, importance_quantize, reference_quantize
from llmpress.compress.quant.gptq import gptq_on_ggml_grid
from llmpress.compress.recipe import parse_recipe
from llmpress.formats import ggml
from llmpress.io.export import export
from llmpress.io.export_gguf import GGUFExportError
from llmpress.layers import GGMLLinear


def _random_fields(t: ggml.GGMLType, rows: int, cols: int, gen: torch.Generator) -> ggml.GGMLWeight:
    nb, nsub = cols // t.block, cols // t.sub
    codes = torch.randint(0, t.max_code + 1, (rows, cols), generator=gen).to(torch.uint8)
    d = (torch.rand(rows, nb, generator=gen) * 0.01).half()
    dmin = sc = mn = None
    if t.k_quant:
        lo, hi = {"q3_k": (-32, 32), "q6_k": (-128, 128), "q2_k": (0, 16)}.get(t.name, (0, 64))
        sc = torch.randint(lo, hi, (rows, nsub), generator=gen)
        if t.zero is None:
            mn = torch.randint(0, hi, (rows, nsub), generator=gen)
            dmin = (torch.rand(rows, nb, generator=gen) * 0.01).half()
    elif t.zero is None:
        dmin = (torch.randn(rows, nb, generator=gen) * 0.01).half()
    return ggml.GGMLWeight(t, codes, d, dmin, sc, mn)


@pytest.mark.parametrize("name", sorted(ggml.TYPES))
def test_blocks_round_trip_and_dequantize_as_the_gguf_package(name):
    t = ggml.TYPES[name]
    w = _random_fields(t, 5, 512, torch.Generator().manual_seed(t.type_id))
    data = ggml.pack(w)
    assert data.shape == (5, ggml.row_bytes(t, 512)) and data.dtype == torch.uint8
    back = ggml.unpack(t, data, 512)
    assert torch.equal(back.codes, w.codes) and torch.equal(back.d, w.d)
    for field in ("dmin", "sc", "mn"):
        a, b = getattr(w, field), getattr(back, field)
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.equal(a.to(torch.float64), b.to(torch.float64))
    theirs = gguf.quants.dequantize(data.numpy(), gguf.GGMLQuantizationType(t.type_id))
    assert np.array_equal(theirs, w.dequantize().numpy())


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0"])
def test_legacy_reference_is_the_gguf_packages_quantizer(name):
    w = torch.randn(8, 256, generator=torch.Generator().manual_seed(1)) * 0.05
    t = ggml.TYPES[name]
    theirs = gguf.quants.quantize(w.numpy(), gguf.GGMLQuantizationType(t.type_id))
    assert np.array_equal(ggml.pack(reference_quantize(w, name)).numpy(), theirs)


@pytest.mark.parametrize("name", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_k_quant_reference_rounds_every_weight_to_its_stored_grid(name):
    """After the scale search every weight is the nearest point of its sub-block's stored grid
    (what llama.cpp's reference does last), and more bits give a smaller error."""
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(16, 512, generator=gen) * 0.03
    w[0] = 0.0                                   # a flat row: zero scales, no NaN
    q = reference_quantize(w, name)
    t = q.type
    a, b = q.step_and_offset()
    values = torch.arange(t.max_code + 1, dtype=torch.float32)
    sub = w.view(16, -1, t.sub)
    grid = a[..., None] * values - b[..., None] if b is not None else a[..., None] * (values - t.zero)
    nearest = (sub[..., None] - grid[:, :, None, :]).abs().min(dim=-1).values
    err = (q.dequantize().view_as(sub) - sub).abs()
    assert torch.allclose(err, nearest, atol=1e-7)
    assert torch.equal(q.dequantize()[0], torch.zeros(512))
    assert torch.isfinite(q.dequantize()).all()


def test_more_bits_less_error():
    w = torch.randn(32, 512, generator=torch.Generator().manual_seed(3)) * 0.03
    errors = [float((reference_quantize(w, n).dequantize() - w).norm()) for n in ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")]
    assert errors == sorted(errors, reverse=True)


def test_types_fall_back_as_llama_quantize_does():
    assert ggml.type_for_width("q4_k", 576).name == "q5_0"
    assert ggml.type_for_width("q2_k", 576).name == "q4_0"
    assert ggml.type_for_width("q3_k", 1536).name == "q3_k"
    assert ggml.type_for_width("q6_k", 576).name == "q8_0"
    assert ggml.type_for_width("q5_k", 96).name == "q5_1"
    with pytest.raises(ValueError, match="whole number"):
        ggml.type_for_width("q4_0", 100)


def _uneven_inputs(gen: torch.Generator, cols: int = 256) -> torch.Tensor:
    """Correlated calibration inputs whose columns differ in scale by up to 20x."""
    x = torch.randn(2048, cols, generator=gen) @ (torch.randn(cols, cols, generator=gen) * 0.2 + torch.eye(cols))
    return x * (0.15 + 2.85 * torch.rand(cols, generator=gen))


@pytest.mark.parametrize("name", sorted(ggml.TYPES))
def test_importance_search_weighs_the_inputs(name):
    """llama.cpp's imatrix search: a lower importance-weighted error than the plain search (equal
    bytes for Q8_0, which has none), the same bytes for any power-of-two multiple of the
    importance, and, for K-quants, every weight still on its nearest stored grid point."""
    gen = torch.Generator().manual_seed(6)
    importance = _uneven_inputs(gen).pow(2).mean(dim=0)
    w = torch.randn(32, 256, generator=gen) * 0.05
    w[0] = 0.0                                   # a flat row: zero scales, no NaN
    fitted = importance_quantize(w, name, importance)
    assert torch.equal(ggml.pack(importance_quantize(w, name, importance * 4)), ggml.pack(fitted))
    plain = reference_quantize(w, name)

    def weighted_error(q):
        return float((((q.dequantize() - w) ** 2) * importance).sum())

    if name == "q8_0":
        assert torch.equal(ggml.pack(fitted), ggml.pack(plain))
    else:
        assert weighted_error(fitted) < weighted_error(plain)
    assert torch.equal(fitted.dequantize()[0], torch.zeros(256)) and torch.isfinite(fitted.dequantize()).all()
    t = fitted.type
    if t.k_quant:
        a, b = fitted.step_and_offset()
        live = a != 0
        values = torch.arange(t.max_code + 1, dtype=torch.float32)
        sub = w.view(32, -1, t.sub)
        grid = a[..., None] * values - b[..., None] if b is not None else a[..., None] * (values - t.zero)
        nearest = (sub[..., None] - grid[:, :, None, :]).abs().min(dim=-1).values
        err = (fitted.dequantize().view_as(sub) - sub).abs()
        assert torch.allclose(err[live], nearest[live], atol=1e-7)
    with pytest.raises(ValueError, match="importance has 255 entries"):
        importance_quantize(w, name, importance[:255])


@pytest.mark.parametrize("imatrix", [False, True])
@pytest.mark.parametrize("name", ["q4_0", "q2_k", "q3_k", "q4_k", "q6_k"])
def test_gptq_on_the_grid_keeps_the_grid_and_lowers_the_output_error(name, imatrix):
    gen = torch.Generator().manual_seed(4)
    x = _uneven_inputs(gen) if imatrix else \
        torch.randn(2048, 256, generator=gen) @ (torch.randn(256, 256, generator=gen) * 0.2 + torch.eye(256))
    hessian = x.T @ x / x.shape[0]
    w = torch.randn(64, 256, generator=gen) * 0.05
    ref = importance_quantize(w, name, torch.diagonal(hessian)) if imatrix else reference_quantize(w, name)
    solved, _ = gptq_on_ggml_grid(w, hessian, name, imatrix=imatrix)
    for field in ("d", "dmin", "sc", "mn"):
        a, b = getattr(ref, field), getattr(solved, field)
        assert (a is None and b is None) or torch.equal(a, b)

    def output_error(q):
        delta = q.dequantize() - w
        return float(((delta @ hessian) * delta).sum())

    assert output_error(solved) < 0.8 * output_error(ref)


def test_fixed_grid_rounds_like_the_reference_without_updates():
    """With an identity Hessian GPTQ spreads no error, so its codes are the reference's."""
    w = torch.randn(16, 256, generator=torch.Generator().manual_seed(5)) * 0.05
    for name in ("q3_k", "q4_k"):
        ref = reference_quantize(w, name)
        grid = FixedGGMLGrid(ref)
        codes = torch.stack([grid.round(j, w[:, j])[0] for j in range(256)], dim=1)
        assert torch.equal(codes.to(torch.uint8), ref.codes)


def test_grid_stage_settings():
    stage = parse_recipe({"stages": [{"method": "gptq", "grid": "q3_k"}]}).stages[0]
    assert (stage.bits, stage.group_size, stage.label, stage.imatrix) == (3, 256, "gptq Q3_K imatrix", True)
    rtn = parse_recipe({"stages": [{"method": "rtn", "grid": "q3_k"}]}).stages[0]
    assert not rtn.imatrix and rtn.needs == frozenset() and rtn.label == "rtn Q3_K"
    assert rtn.model_copy(update={"imatrix": True}).needs == frozenset({"hessian"})
    # on the uniform grid the setting has nothing to fit: no calibration asked for
    assert parse_recipe({"stages": [{"method": "rtn", "bits": 4, "imatrix": True}]}).stages[0].needs == frozenset()
    mixed = parse_recipe({"stages": [{"method": "rtn", "grid": "q4_k", "overrides": {"down_proj": {"grid": "q6_k"}}}]})
    assert mixed.stages[0].for_module("layers.0.mlp.down_proj").bits == 6
    uniform = mixed.stages[0].for_module("layers.0.self_attn.q_proj")
    assert (uniform.grid, uniform.bits) == ("q4_k", 4)


# -- export ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def k_quant_llama(tmp_path_factory, smol_tokenizer):
    """A random Llama whose linears are whole K-quant super-blocks wide (256 and 512)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256, tie_word_embeddings=True)
    folder = tmp_path_factory.mktemp("k-llama")
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _logits(model):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _gguf_logits(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return _logits(model.eval())


def _check_gguf(src, path):
    """The file loads in transformers with llmpress's logits, and every quantized tensor
    dequantizes (gguf's own code) to the module's weight."""
    model, _ = llmpress.load(src)
    a, b = _logits(model), _gguf_logits(path)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-4
    reader = gguf.GGUFReader(path)
    quantized = [t for t in reader.tensors if t.tensor_type.name.lower() in ggml.TYPES]
    modules = [m for m in model.modules() if isinstance(m, GGMLLinear)]
    assert quantized and len(quantized) == len(modules)
    return reader


@pytest.mark.parametrize("recipe", [
    {"method": "rtn", "grid": "q4_k"},
    {"method": "rtn", "grid": "q4_k", "imatrix": True},
    {"method": "gptq", "grid": "q3_k", "overrides": {"down_proj": {"grid": "q6_k"}}},
    {"method": "gptq", "grid": "q2_k", "act_order": False},
])
def test_k_quant_model_exports_to_gguf_that_transformers_runs(recipe, k_quant_llama, tmp_path):
    out = tmp_path / "m"
    llmpress.compress(k_quant_llama, parse_recipe({"stages": [recipe]}), out=out, nsamples=4, seqlen=32, progress=False)
    path = export(out, tmp_path / "m.gguf", "gguf", dtype="float32")
    reader = _check_gguf(out, path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == recipe["grid"].upper()
    if "overrides" in recipe:
        assert types["blk.1.ffn_down.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_norm.weight"] == "F32"
    # the q/k rows are in llama.cpp's rotary order; gguf's dequantizer agrees with the stored module
    model, _ = llmpress.load(out)
    by_name = {t.name: t for t in reader.tensors}
    v = model.get_submodule("model.layers.1.self_attn.v_proj")
    theirs = gguf.quants.dequantize(np.asarray(by_name["blk.1.attn_v.weight"].data), by_name["blk.1.attn_v.weight"].tensor_type)
    assert np.array_equal(theirs, v.dequantize(torch.float32).numpy())


def _qwen3_wide_heads(folder, tokenizer):
    """transformers' GGUF reader takes Qwen3's head width from its config default (128), not from
    the file's key length: the tiny Qwen3 gets 128-wide heads to be readable there."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=128, vocab_size=49152, max_position_embeddings=256)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _gpt2_long_context(folder, tokenizer):
    """transformers' GGUF reader sizes GPT-2's position table from its config default (1024)."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, vocab_size=49152)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gpt2"])
def test_legacy_grid_and_uniform_groups_of_32_export_for_each_family(arch, tiny_model_factory, smol_tokenizer, tmp_path):
    custom = {"qwen3": _qwen3_wide_heads, "gpt2": _gpt2_long_context}.get(arch)
    folder = custom(tmp_path / "src", smol_tokenizer) if custom else tiny_model_factory(arch)
    out = tmp_path / "m"
    recipe = {"method": "gptq", "grid": "q4_0", "overrides": {"v_proj": {"grid": "q8_0"}, "down_proj": {"grid": "q5_1"}}}
    llmpress.compress(folder, parse_recipe({"stages": [recipe]}), out=out, nsamples=4, seqlen=32, progress=False)
    _check_gguf(out, export(out, tmp_path / "m.gguf", "gguf", dtype="float32"))
    # llmpress's own uniform grid: symmetric 4-bit groups of 32 are Q4_0 exactly
    uni = tmp_path / "u"
    llmpress.compress(folder, parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 32, "sym": True}]}),
                      out=uni, progress=False)
    path = export(uni, tmp_path / "u.gguf", "gguf", dtype="float32")
    model, _ = llmpress.load(uni)
    a, b = _logits(model), _gguf_logits(path)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-4


def test_dense_model_exports_to_gguf(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen2")   # q/k/v biases, untied head
    path = export(folder, tmp_path / "d.gguf", "gguf", dtype="float32")
    model, _ = llmpress.load(folder)
    a, b = _logits(model), _gguf_logits(path)
    assert float((a - b).abs().max() / a.abs().max()) <= 1e-5
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.tokens"].contents()[1] == "<|im_start|>"


def test_gguf_export_refuses_what_no_ggml_type_holds(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    cases = [
        ({"method": "gptq", "bits": 4, "group_size": 32, "act_order": True}, "act-order"),
        ({"method": "rtn", "bits": 3, "group_size": 32}, "gptq-q3_k"),
        ({"method": "shiftadd", "bits": 2}, "no GGUF type"),
    ]
    for i, (stage, message) in enumerate(cases):
        out = tmp_path / f"m{i}"
        llmpress.compress(folder, parse_recipe({"stages": [stage]}), out=out, nsamples=4, seqlen=32, progress=False)
        with pytest.raises(GGUFExportError, match=message):
            export(out, tmp_path / f"m{i}.gguf", "gguf")
        assert not (tmp_path / f"m{i}.gguf").exists() and not list(tmp_path.glob(".m*.gguf.tmp-*"))
    unsupported = tiny_model_factory("opt")   # no GGUF architecture in llama.cpp
    result = CliRunner().invoke(app, ["export", str(unsupported), "--format", "gguf", "--out", str(tmp_path / "o.gguf")])
    assert result.exit_code != 0 and "GGUF export supports" in result.output and "Traceback" not in result.output
    (tmp_path / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", str(folder), "--format", "gguf", "--out", str(tmp_path / "notes.txt"),
                                      "--overwrite"])
    assert result.exit_code != 0 and "not a GGUF file" in result.output
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_inspect_names_the_ggml_type(tiny_model_factory, tmp_path):
    out = tmp_path / "m"
    llmpress.compress(tiny_model_factory("llama"), "rtn-q4_k", out=out, progress=False)
    result = CliRunner().invoke(app, ["inspect", str(out)])
    assert result.exit_code == 0
    # 64- and 160-wide rows are not whole Q4_K super-blocks: llama.cpp's fallback type, named
    assert "GGUF Q5_0" in result.output


def test_q4_k_m_mixture_is_llama_cpps_assignment(tiny_model_factory, tmp_path):
    from llmpress.compress.quant.ggml_grid import mixture_overrides

    picked = mixture_overrides("q4_k_m", "model.layers", 30, ["self_attn.v_proj", "mlp.down_proj", "mlp.up_proj"])
    layers = sorted({int(p.split(r"\.")[2]) for p in picked})
    assert layers == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert all("up_proj" not in p for p in picked) and all(v == {"grid": "q6_k"} for v in picked.values())
    out = tmp_path / "m"
    llmpress.compress(tiny_model_factory("llama"), "rtn-q4_k_m", out=out, progress=False)
    model, _ = llmpress.load(out)
    types = {n: m.type.name for n, m in model.named_modules() if isinstance(m, GGMLLinear)}
    # three layers: only the last gets more bits; 64/160-wide rows take the K types' fallbacks
    assert types["model.layers.2.self_attn.v_proj"] == "q8_0" and types["model.layers.1.self_attn.v_proj"] == "q5_0"
    assert types["model.layers.2.mlp.down_proj"] == "q8_0" and types["model.layers.2.mlp.up_proj"] == "q5_0"


@pytest.mark.parametrize("name", sorted(ggml.TYPES))
def test_decoding_gemv_equals_the_reference(name):
    """Decoding rows on CPU take the C++ affine GEMV on the decoded codes; it computes the
    reference's product (dequantize, then matmul) to fp32 rounding, and notices new blocks; larger
    inputs get the reference's weight exactly."""
    from llmpress.kernels.dispatch import use_backend

    gen = torch.Generator().manual_seed(6)
    w = torch.randn(96, 512, generator=gen) * 0.05
    layer = GGMLLinear.from_weight(reference_quantize(w, name), torch.randn(96, generator=gen), torch.float32)
    x = torch.randn(2, 3, 512, generator=gen)
    fast = layer(x)
    with use_backend("reference"):
        ref = layer(x)
    assert fast.shape == ref.shape == (2, 3, 96)
    assert float((fast - ref).abs().max()) <= 1e-5 * float(ref.abs().max())
    layer.blocks.copy_(ggml.pack(reference_quantize(-w, name)))
    with use_backend("reference"):
        flipped = layer(x)
    assert torch.allclose(layer(x), flipped, rtol=0, atol=1e-5 * float(flipped.abs().max()))
    # prefill rows compute the weight from the decoded codes with the reference's arithmetic: equal
    prefill = torch.randn(40, 512, generator=gen)
    with use_backend("reference"):
        expected = layer(prefill)
    assert torch.equal(layer(prefill), expected)
