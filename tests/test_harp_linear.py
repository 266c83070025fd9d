"""Per-linear HARP: the butterfly processors, the fit, the stored layer and the method end to end."""

from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.compress.recipe import parse_recipe
from llmpress.compress.rotate.hadamard import randomized_hadamard
from llmpress.compress.rotate.harp_linear import TrainableButterfly, fit_processors, rotate_problem
from llmpress.errors import LlmpressError, RecipeError
from llmpress.formats.butterfly import radices
from llmpress.layers import HarpLinear, QuantLinear
from llmpress.layers.harp_linear import ButterflyMap

WIDTHS = [64, 160, 192, 576]


def _random_map(n: int, fixed_odd: bool, seed: int = 0) -> TrainableButterfly:
    t = TrainableButterfly(n, seed, fixed_odd=fixed_odd)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return t


@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("fixed_odd", [True, False])
def test_processors_are_orthogonal_and_start_at_the_randomized_hadamard(n, fixed_odd):
    start = TrainableButterfly(n, 3, fixed_odd=fixed_odd)
    eye = torch.eye(n, dtype=torch.float64)
    with torch.no_grad():
        assert (start.apply(eye) - randomized_hadamard(n, 3)).abs().max() < 1e-6   # Θ = 0: the RHT, same signs
        q = _random_map(n, fixed_odd).apply(eye)
    assert (q @ q.T - eye).abs().max() < 1e-6
    assert not torch.allclose(q, randomized_hadamard(n, 0), atol=1e-3)   # the parameters do act


@pytest.mark.parametrize("n", WIDTHS)
def test_the_stored_map_applies_the_fitted_one_and_its_transpose_inverts_it(n):
    fitted = _random_map(n, fixed_odd=True)
    signs, thetas = fitted.stored()
    stored = ButterflyMap(n, fixed_odd=True)
    stored.load_parameters(signs, thetas)
    x = torch.randn(5, n, dtype=torch.float64)
    with torch.no_grad():   # the fit rounds Θ to fp16 once; the stored map is that rounding
        for t, p in fitted.thetas.items():
            p.copy_(thetas[int(t)].float())
        assert torch.allclose(stored.apply(x), fitted.apply(x.float()).double(), atol=1e-5)
    assert torch.allclose(stored.apply(stored.apply(x), transpose=True), x, atol=1e-6)   # fp32 blocks
    odd = [b for b in radices(n) if b & (b - 1)]
    assert stored.stored_bits() == n * 8 + sum(n // b * b * (b - 1) // 2 * 16 for b in radices(n) if b not in odd)


def _problem(m=48, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * torch.linspace(0.2, 3, n)     # uneven columns, as real weights
    w[:, 5] *= 8                                                         # and an outlier column
    x = torch.randn(512, n, generator=g) * torch.linspace(3, 0.3, n)
    return w, x.T @ x / 512


def test_fit_lowers_the_proxy_and_never_ends_above_its_start():
    w, h = _problem()
    fit = fit_processors({"a": w}, h, {"a": (3, 16, False)}, seeds={"a": 1}, input_seed=2,
                         steps=40, lr=0.03, refresh=1, fixed_odd=True)
    assert fit.history[0] == (0, fit.initial)
    assert fit.final < 0.97 * fit.initial
    assert fit.final == min(v for _, v in fit.history)   # the best Θ seen is the one kept
    # a learning rate that only makes it worse still returns the start
    bad = fit_processors({"a": w}, h, {"a": (3, 16, False)}, seeds={"a": 1}, input_seed=2,
                         steps=5, lr=50.0, refresh=1, fixed_odd=True)
    assert bad.final <= bad.initial


def test_the_processed_problem_is_the_same_problem_in_other_bases():
    """``W̃ = Q_outᵀ W Q_in``, ``H̃ = Q_inᵀ H Q_in``: the layer's output error ``tr(Δ H Δᵀ)`` is the
    same in both bases, and undoing the processors gives ``W`` back to fp32 tolerance."""
    w, h = _problem()
    q_in, q_out = ButterflyMap(64, fixed_odd=True), ButterflyMap(48, fixed_odd=True)
    for side, fitted in ((q_in, _random_map(64, True, 1)), (q_out, _random_map(48, True, 2))):
        side.load_parameters(*fitted.stored())
    cross = torch.randn(64, 64)
    wt, stats = rotate_problem(w, {"hessian": h, "cross": cross, "input_drift": 0.5}, q_in, q_out)
    qi, qo = q_in.apply(torch.eye(64, dtype=torch.float64)), q_out.apply(torch.eye(48, dtype=torch.float64))
    assert torch.allclose(wt.double(), qo.T @ w.double() @ qi, atol=1e-5)
    assert torch.allclose(stats["hessian"].double(), qi.T @ h.double() @ qi, atol=1e-4)
    assert torch.allclose(stats["cross"].double(), qi.T @ cross.double() @ qi, atol=1e-4)
    assert stats["input_drift"] == 0.5
    delta = torch.randn(48, 64, dtype=torch.float64)
    assert torch.allclose(((qo.T @ delta @ qi) @ stats["hessian"].double() * (qo.T @ delta @ qi)).sum(),
                          (delta @ h.double() * delta).sum(), rtol=1e-5)
    back = q_out.apply(q_in.apply(wt.double(), transpose=True).T, transpose=True).T
    assert (back - w.double()).abs().max() < 1e-5 * w.abs().max()


def test_harp_linear_computes_its_dequantized_weight():
    from llmpress.compress.quant.rtn import rtn_quantize

    w, _ = _problem()
    inner = QuantLinear.from_quantized(rtn_quantize(w, bits=4, group_size=16, sym=False), None, torch.float32)
    layer = HarpLinear(64, 48, inner=inner, bias=True)
    layer.input.load_parameters(*_random_map(64, True, 1).stored())
    layer.output.load_parameters(*_random_map(48, True, 2).stored())
    layer.bias.normal_()
    x = torch.randn(3, 7, 64)
    dense = layer.dequantize(torch.float64)
    assert torch.allclose(layer(x).double(), x.double() @ dense.T + layer.bias.double(), atol=1e-4)
    q_in = layer.input.apply(torch.eye(64, dtype=torch.float64))
    q_out = layer.output.apply(torch.eye(48, dtype=torch.float64))
    assert torch.allclose(dense, q_out @ inner.dequantize(torch.float64) @ q_in.T, atol=1e-6)
    with pytest.raises(ValueError, match="must not hold the bias"):
        HarpLinear(64, 48, inner=QuantLinear(64, 48, bits=4, group_size=16, sym=False, bias=True), bias=True)


# -- the method, end to end ------------------------------------------------------------------------

HARP_W3 = {"stages": [{"method": "harp", "steps": 6, "refresh": 2},
                      {"method": "gptq", "bits": 3, "group_size": 32}]}


def _logits(model):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_per_linear_harp_compresses_saves_and_reloads(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    result = llmpress.compress(folder, parse_recipe(HARP_W3), out=tmp_path / "h", nsamples=4, seqlen=32,
                               progress=False, keep_model=True)
    manifest = json.loads((tmp_path / "h" / "config.json").read_text())["quantization_config"]
    assert manifest["transforms"] == []          # nothing fused: the processors live in the layers
    entry = manifest["modules"]["model.layers.0.self_attn.q_proj"]
    assert entry["format"] == "harp" and entry["params"]["inner"]["format"] == "uniform"
    reloaded, _ = llmpress.load(tmp_path / "h")
    assert isinstance(reloaded.get_submodule("model.layers.1.mlp.down_proj"), HarpLinear)
    assert torch.equal(_logits(result.model), _logits(reloaded))
    # q, k and v read one input: one input processor; each its own output processor
    attn = reloaded.model.layers[0].self_attn
    assert torch.equal(attn.q_proj.input.theta_1, attn.v_proj.input.theta_1)
    assert not torch.equal(attn.q_proj.input.theta_1, attn.o_proj.input.theta_1)
    assert not torch.equal(attn.q_proj.output.signs[:32], attn.k_proj.output.signs)
    for record in result.records:
        assert record.metrics["harp_proxy_end"] <= record.metrics["harp_proxy_start"]
    # the processors' parameters are counted: more bits per weight than the same grid alone
    plain = llmpress.compress(folder, parse_recipe({"stages": HARP_W3["stages"][1:]}), out=tmp_path / "g",
                              nsamples=4, seqlen=32, progress=False)
    bits = {r.name: r.metrics["bits_per_weight"] for r in plain.records}
    assert all(r.metrics["bits_per_weight"] > bits[r.name] for r in result.records)


def test_per_linear_harp_resumes_to_the_same_model(tiny_model_factory, tmp_path, monkeypatch):
    from .test_pipeline import crash_then_resume

    folder = tiny_model_factory("llama")
    assert crash_then_resume(folder, parse_recipe(HARP_W3), tmp_path, monkeypatch) == [2]   # identical tensors
    whole, _ = llmpress.load(tmp_path / "whole")
    resumed, _ = llmpress.load(tmp_path / "part")
    assert torch.equal(_logits(whole), _logits(resumed))


def test_per_linear_harp_refuses_what_it_cannot_serve(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    with pytest.raises(RecipeError, match="not such a quantizer"):
        llmpress.compress(folder, parse_recipe({"stages": [{"method": "harp"}, {"method": "shiftadd", "bits": 3}]}),
                          out=tmp_path / "s", nsamples=4, seqlen=32, progress=False)
    assert not (tmp_path / "s").exists()
    with pytest.raises(RecipeError, match="`bits` only applies to `variant: shared`"):
        parse_recipe({"stages": [{"method": "harp", "bits": 3}, {"method": "gptq", "bits": 3}]})
    llmpress.compress(folder, parse_recipe(HARP_W3), out=tmp_path / "h", nsamples=4, seqlen=32, progress=False)
    from llmpress.io.export import export

    for fmt in ("gptq", "compressed-tensors", "gguf"):
        with pytest.raises(LlmpressError, match="'harp' format"):
            export(tmp_path / "h", tmp_path / f"out-{fmt}", fmt)
        assert not (tmp_path / f"out-{fmt}").exists()
    export(tmp_path / "h", tmp_path / "dense", "dense", dtype="float32")
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    reloaded, _ = llmpress.load(tmp_path / "h")
    a = _logits(reloaded)
    assert (a - _logits(stock)).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("n", [64, 576, 4096])
def test_the_rotated_hessian_diagonal_shortcut_is_exact(n):
    from llmpress.compress.rotate.harp_linear import rotated_hessian_diagonal

    v = _random_map(n, fixed_odd=True)
    x = torch.randn(2 * n, n)
    h = x.T @ x
    with torch.no_grad():
        q = v.apply(torch.eye(n))
        got = rotated_hessian_diagonal(v, v.prefix(v.prefix(h).T), v.learned_blocks())
    expected = ((h @ q) * q).sum(0)
    assert len(v.learned_blocks()[0]) == (1 if n < 4096 else 2)   # both branches
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("n", [64, 160, 576, 4096])
@pytest.mark.parametrize("transpose", [False, True])
def test_the_decoding_kernel_and_the_composed_stages_equal_the_reference(n, transpose, monkeypatch):
    from llmpress.formats.butterfly import apply_butterfly
    from llmpress.kernels import cpu_ext
    from llmpress.kernels.dispatch import use_backend
    from llmpress.layers import harp_linear

    stored = ButterflyMap(n, fixed_odd=True)
    stored.load_parameters(*_random_map(n, True, 4).stored())
    x = torch.randn(3, n)
    with use_backend("reference"):   # stage by stage, as stored
        expected = stored.apply(x.double(), transpose=transpose)
    composed = stored.apply(torch.cat([x] * 8), transpose=transpose)[:3]   # more rows than a decoding batch
    assert torch.allclose(composed.double(), expected, atol=1e-5)
    if cpu_ext.extension() is None:
        return
    # the kernel's arithmetic: exact with fp32 blocks, and with the fp16 ones it reads by default
    # it computes what those rounded blocks give, within a few 1e-4 of the stored map
    monkeypatch.setattr(harp_linear, "ROW_BLOCK_DTYPE", torch.float32)
    stored._forget()
    assert torch.allclose(stored.apply(x, transpose=transpose).double(), expected, atol=1e-5)
    monkeypatch.setattr(harp_linear, "ROW_BLOCK_DTYPE", torch.float16)
    stored._forget()
    got = stored.apply(x, transpose=transpose).double()
    blocks, strides, _ = stored.row_blocks(transpose)
    assert any(k.dtype == torch.float16 for k in blocks)
    rounded, _ = stored._fixed_and_composed(torch.device("cpu"), harp_linear.ROW_MAX_RADIX, torch.float32)
    rounded = [k if k.dim() == 2 else k.half().double() for k in rounded]
    assert torch.allclose(got, apply_butterfly(x.double(), stored.signs, rounded, strides, transpose=transpose), atol=1e-5)
    assert (got - expected).abs().max() < 2e-3 * expected.abs().max()


def test_linked_processors_transform_a_shared_input_once_and_its_outputs_together(tiny_model_factory, tmp_path):
    from llmpress.kernels.dispatch import use_backend
    from llmpress.layers.harp_linear import link_shared_processors

    folder = tiny_model_factory("llama")
    llmpress.compress(folder, parse_recipe(HARP_W3), out=tmp_path / "h", nsamples=4, seqlen=32, progress=False)
    model, _ = llmpress.load(tmp_path / "h")           # loading links them
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attn.q_proj.input is attn.k_proj.input is attn.v_proj.input
    assert attn.q_proj.group is attn.k_proj.group is attn.v_proj.group and len(attn.q_proj.group.members) == 3
    assert mlp.gate_proj.input is mlp.up_proj.input and attn.o_proj.input is not attn.q_proj.input
    assert attn.o_proj.group is None and mlp.gate_proj.group is not attn.q_proj.group
    assert link_shared_processors(model) == 0           # idempotent
    calls = []
    real = ButterflyMap.apply

    def counting(self, x, **kw):
        calls.append(self)
        return real(self, x, **kw)

    ButterflyMap.apply = counting
    try:
        for rows in (1, 40):   # the decoding kernel's outputs in one call, and the batched products
            x = torch.randn(1, rows, 64)
            calls.clear()
            with use_backend("cpu-dequant"):
                outs = [m(x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
            assert sum(c is attn.q_proj.input for c in calls) == 1
            for m, out in zip((attn.q_proj, attn.k_proj, attn.v_proj), outs, strict=True):
                expected = x @ m.dequantize().T   # the decoding kernel reads the blocks in fp16
                assert (out - expected).abs().max() < (1e-5 if rows > 16 else 2e-3) * expected.abs().max()
    finally:
        ButterflyMap.apply = real
    with use_backend("cpu-dequant"):   # another input is transformed again, not served stale
        attn.q_proj(torch.randn(1, 1, 64))
        y = torch.randn(1, 1, 64)
        expected = y @ attn.k_proj.dequantize().T
        assert (attn.k_proj(y) - expected).abs().max() < 2e-3 * expected.abs().max()


def test_a_decoding_step_in_one_call_equals_the_modules_one_by_one(tiny_model_factory, tmp_path, monkeypatch):
    from llmpress.kernels import cpu_ext
    from llmpress.layers import harp_linear

    if cpu_ext.extension() is None:
        pytest.skip("needs the C++ kernels")
    folder = tiny_model_factory("llama")
    llmpress.compress(folder, parse_recipe(HARP_W3), out=tmp_path / "h", nsamples=4, seqlen=32, progress=False)
    model, _ = llmpress.load(tmp_path / "h")
    layer = model.model.layers[0]
    linears = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
               layer.mlp.gate_proj, layer.mlp.up_proj]
    taken = []
    real = harp_linear.fused_int4_step

    def recording(members, x):
        out = real(members, x)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(harp_linear, "fused_int4_step", recording)
    x = torch.randn(1, 1, 64)
    fused = [m(x) for m in linears]   # the int4 path of decoding rows (the default backend)
    assert taken == [True, True, True]   # q/k/v as one group (k and v served from it), o, gate/up
    monkeypatch.setattr(harp_linear, "fused_int4_step", lambda members, x: None)
    for out, m in zip(fused, linears, strict=True):
        assert torch.allclose(out, m(x), rtol=0, atol=1e-6)   # the same operations, module by module
        expected = x @ m.dequantize().T   # bf16 activations in the int4 kernel
        assert (out - expected).abs().max() < 2e-2 * expected.abs().max()


def test_per_linear_harp_brings_calibration_to_a_data_free_quantizer(tiny_model_factory, tmp_path):
    """RTN reads no statistics; with HARP in front every linear is calibrated for its fit, which
    starts at the RHT's proxy (``steps: 0``; the first group's inputs are the same in both runs)
    and lowers it."""
    folder = tiny_model_factory("llama")
    rtn = {"method": "rtn", "bits": 3, "group_size": 32}
    runs = {steps: llmpress.compress(folder, parse_recipe({"stages": [{"method": "harp", "steps": steps}, rtn]}),
                                     out=tmp_path / f"s{steps}", nsamples=4, seqlen=32, progress=False)
            for steps in (0, 12)}
    start = {r.name: r.metrics for r in runs[0].records}
    for r in runs[12].records:
        assert r.metrics["harp_proxy_end"] < r.metrics["harp_proxy_start"]
        if r.name.startswith("model.layers.0.self_attn.") and not r.name.endswith("o_proj"):
            assert r.metrics["harp_proxy_start"] == pytest.approx(start[r.name]["harp_proxy_start"], rel=1e-6)
    assert runs[12].summary["HARP processors"].startswith("21 linears")
