"""D²Quant: the dual-scale quantizer (DSQ), its absorption into up_proj, the deviation-aware
correction (DAC) and the preset end to end."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import llmpress
from llmpress.compress.correction import (
    ShiftedNorm,
    absorb_column_scale,
    fold_shift_into_bias,
    mean_shift,
    norm_output_mean,
)
from llmpress.compress.quant.dsq import dsq_quantize, fit_column_scale, fit_dual_scale, gar_permutation
from llmpress.compress.quant.gptq import Residual, gptq_quantize
from llmpress.compress.quant.rtn import rtn_quantize
from llmpress.compress.stats import StopForward
from llmpress.errors import RecipeError
from llmpress.formats.dual_scale import dual_scale_dense
from llmpress.kernels.lut import lut_gemv_scaled
from llmpress.layers import DualScaleLinear, QuantLinear


def _problem(seed=0, out=96, inp=256):
    """A weight with uneven column magnitudes and correlated inputs of uneven scale."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * (torch.rand(inp, generator=g) * 2 + 0.2)
    x = torch.randn(2000, inp, generator=g) @ (torch.eye(inp) + 0.1 * torch.randn(inp, inp, generator=g))
    x = x * (torch.rand(inp, generator=g) * 3 + 0.1)
    return w, x.T @ x / x.shape[0]


def _output_error(dense, w, h):
    d = dense.double() - w.double()
    return float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())


@pytest.mark.parametrize("bits", [2, 3])
def test_dsq_beats_rtn_and_gptq_at_the_same_bits(bits):
    w, h = _problem()
    q = dsq_quantize(w, h, bits=bits, group_size=64)
    dsq = _output_error(dual_scale_dense(q.signs, q.scales, 64, q.column_scale), w, h)
    gptq = _output_error(gptq_quantize(w, h, bits=bits, group_size=64, act_order=True).dequantize(), w, h)
    rtn = _output_error(rtn_quantize(w, bits=bits, group_size=64).dequantize(), w, h)
    assert dsq < gptq < rtn, (dsq, gptq, rtn)
    # the weight objective alone (the ALS fit): below RTN's weight error too
    r, c = fit_dual_scale(w[:, :64], bits)
    from llmpress.compress.quant.bcq import nearest_codes

    fitted = c * (nearest_codes(w[:, :64] / c, r) * r.unsqueeze(1)).sum(-1)
    rtn_w = rtn_quantize(w[:, :64], bits=bits, group_size=64).dequantize()
    assert (fitted - w[:, :64]).norm() < (rtn_w - w[:, :64]).norm()


def test_dsq_scales_are_fp16_and_levels_are_what_the_codes_say():
    w, h = _problem(1, out=32, inp=128)
    q = dsq_quantize(w, h, bits=2, group_size=64)
    assert torch.equal(q.scales, q.scales.half().float()) and torch.equal(q.column_scale, q.column_scale.half().float())
    assert bool((q.scales >= 0).all()) and bool((q.column_scale > 0).all())
    # every dequantized weight is c_j·(±r1 ± r2) of its row and group
    dense = dual_scale_dense(q.signs, q.scales, 64, q.column_scale)
    r = q.scales[:, 5, 1]                                             # row 5, group 1
    levels = torch.tensor([s1 * r[0] + s2 * r[1] for s1 in (-1, 1) for s2 in (-1, 1)])
    for j in range(64, 128, 9):
        assert torch.isclose((dense[5, j] / q.column_scale[j] - levels).abs().min(), torch.tensor(0.0), atol=1e-5)


def test_dsq_fits_each_group_on_its_current_weights_whatever_the_lazy_block():
    """Groups of 64 inside lazy blocks of 128: the second group of a block must be fitted on the
    weights the first group's errors already moved (as with blocks of 64), not on stale ones."""
    w, h = _problem(7, out=48, inp=256)
    a = dsq_quantize(w, h, bits=2, group_size=64, block_size=128)
    b = dsq_quantize(w, h, bits=2, group_size=64, block_size=64)
    assert torch.equal(a.signs, b.signs) and torch.equal(a.scales, b.scales) and torch.equal(a.column_scale, b.column_scale)


def test_gar_keeps_groups_whole_and_orders_by_the_hessian():
    diag = torch.tensor([1.0, 5.0, 2.0, 9.0, 0.5, 3.0, 4.0, 0.1])
    perm = gar_permutation(torch.diag(diag), 4)
    assert perm.tolist() == [3, 1, 2, 0, 6, 5, 4, 7]   # group 0 (max 9) first, each sorted inside


def test_dsq_with_identical_streams_is_the_plain_solve():
    """GPTAQ's residual term vanishes when the two streams agree (ΔX = 0)."""
    w, h = _problem(2, out=32, inp=128)
    plain = dsq_quantize(w, h, bits=2, group_size=64)
    zero = dsq_quantize(w, h, bits=2, group_size=64, residual=Residual(torch.zeros_like(h)))
    assert torch.equal(plain.signs, zero.signs) and torch.equal(plain.scales, zero.scales)


def test_uniform_form_column_scale_lowers_the_weight_error():
    w, _ = _problem(3)
    c = fit_column_scale(w, 2, 64)
    scaled = rtn_quantize(w / c, bits=2, group_size=64).dequantize() * c
    plain = rtn_quantize(w, bits=2, group_size=64).dequantize()
    assert (scaled - w).norm() < (plain - w).norm()


@pytest.mark.parametrize("tokens", [1, 5, 12])
def test_dual_scale_linear_forward_is_its_dense_weight(tokens):
    w, h = _problem(4, out=40, inp=128)
    q = dsq_quantize(w, h, bits=3, group_size=64)
    layer = DualScaleLinear.from_dsq(q, torch.randn(40), torch.float32)
    x = torch.randn(tokens, 128)
    dense = dual_scale_dense(q.signs, q.scales, 64, q.column_scale)
    torch.testing.assert_close(layer(x), x @ dense.T + layer.bias, rtol=1e-5, atol=1e-5)
    assert layer.stored_bits() == 3 * 40 * 128 + 3 * 40 * 2 * 16 + 128 * 16
    # the LUT path with float scales equals the plain product of the unscaled weight
    y = lut_gemv_scaled(x.double(), layer.sign_bits, layer.scales.double(), 64, 40)
    torch.testing.assert_close(y, x.double() @ dual_scale_dense(q.signs, q.scales, 64).double().T)


def _gated_mlp(seed=0, hidden=32, inter=96):
    g = torch.Generator().manual_seed(seed)
    gate, up, down = nn.Linear(hidden, inter, bias=False), nn.Linear(hidden, inter, bias=True), nn.Linear(inter, hidden, bias=False)
    for lin in (gate, up, down):
        lin.weight.data = torch.randn(lin.weight.shape, generator=g) / lin.in_features ** 0.5
    up.bias.data = torch.randn(inter, generator=g)
    x = torch.randn(50, hidden, generator=g)
    return gate, up, down, x


def test_absorbing_the_column_scale_into_up_proj_leaves_the_mlp_unchanged():
    gate, up, down, x = _gated_mlp()
    c = torch.rand(96) * 2 + 0.1
    scaled_down = nn.Linear(96, 32, bias=False)
    scaled_down.weight.data = down.weight.data / c          # W_down = S·diag(c) with S = W_down / c
    expected = down(nn.functional.silu(gate(x)) * up(x))
    assert absorb_column_scale(up, c)      # a dense up_proj: exact in fp32
    torch.testing.assert_close(scaled_down(nn.functional.silu(gate(x)) * up(x)), expected, rtol=1e-5, atol=1e-5)

    gate, up, down, x = _gated_mlp(1)
    scaled_down.weight.data = down.weight.data / c
    packed_up = QuantLinear.from_quantized(rtn_quantize(up.weight.data, bits=4, group_size=16), up.bias, torch.float32)
    expected = down(nn.functional.silu(gate(x)) * packed_up(x))
    assert absorb_column_scale(packed_up, c)   # fp16 scales: exact up to their rounding
    torch.testing.assert_close(scaled_down(nn.functional.silu(gate(x)) * packed_up(x)), expected, rtol=2e-3, atol=2e-3)
    assert not absorb_column_scale(DualScaleLinear.from_dsq(dsq_quantize(up.weight.data, torch.eye(32), bits=2,
                                                                         group_size=16), None, torch.float32),
                                   c)


class _Block(nn.Module):
    """A residual block with a norm whose output the MLP reads."""

    def __init__(self, shift: torch.Tensor | None = None):
        super().__init__()
        self.attn = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.shift = shift

    def forward(self, x):
        h = x + self.attn(x)
        n = self.norm(h)
        return n - self.shift if self.shift is not None else n


def test_dac_measures_a_planted_mean_shift_and_leaves_out_the_first_positions():
    torch.manual_seed(0)
    block = _Block()
    hidden = torch.randn(6, 10, 16)
    hidden[:, 0] *= 50                                       # attention-sink-like outliers at position 0

    def run():
        for s in range(0, 6, 4):
            try:
                block(hidden[s:s + 4])
            except StopForward:
                pass

    teacher = norm_output_mean(block.norm, run, skip_first=1)
    with torch.no_grad():
        expected = block.norm(hidden + block.attn(hidden))[:, 1:].reshape(-1, 16).double().mean(0)
    torch.testing.assert_close(teacher, expected)
    planted = torch.linspace(-0.5, 0.5, 16)
    real = block.norm
    block.norm = ShiftedNorm(real, -planted)                 # the "quantized" block: its norm output shifted
    student = norm_output_mean(block.norm, run, skip_first=1)
    torch.testing.assert_close(mean_shift(teacher, student, clip=10.0, scale=1.0), planted, rtol=1e-5, atol=1e-6)
    assert float(mean_shift(teacher, student, clip=0.1, scale=1.0).abs().max()) == pytest.approx(0.1)


def test_dac_shift_folds_exactly_into_the_readers_biases():
    torch.manual_seed(1)
    lin = nn.Linear(16, 24, bias=False)
    packed = QuantLinear.from_quantized(rtn_quantize(lin.weight.data, bits=4, group_size=8), None, torch.float32)
    shift, n = torch.randn(16), torch.randn(5, 16)
    expected = packed(n + shift)
    fold_shift_into_bias(packed, shift)
    assert packed.format_params()["bias"] is True            # the manifest records the new bias
    torch.testing.assert_close(packed(n), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_d2quant_preset_saves_and_reloads_exactly(tiny_model_factory, tmp_path, arch):
    res = llmpress.compress(tiny_model_factory(arch), "d2quant-w2-g64", out=tmp_path / "d", nsamples=8, seqlen=32,
                            progress=False, keep_model=True, drop=["rht"] if arch == "gemma2" else None)
    loaded, _ = llmpress.load(tmp_path / "d")
    downs = [m for n, m in loaded.named_modules() if n.endswith("mlp.down_proj")]
    assert downs and all(isinstance(m, DualScaleLinear) and m.column_scale is None for m in downs)   # absorbed
    ups = [m for n, m in loaded.named_modules() if n.endswith(("mlp.up_proj", "mlp.gate_proj"))]
    assert all(m.bias is not None for m in ups)             # the correction, folded
    shifts = [r.metrics["dac_shift"] for r in res.records if r.name.endswith("up_proj")]
    assert len(shifts) == len(downs) and all(s > 0 for s in shifts)
    head = loaded.get_output_embeddings()
    assert head.bias is not None and float(head.bias.abs().max()) > 0   # the final norm's correction
    for ids in (torch.randint(0, 1000, (1, 4)), torch.randint(0, 1000, (2, 24))):   # LUT and dense paths
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)


def test_ablation_flags_remove_stages_and_name_the_run(tiny_model_factory, tmp_path):
    from llmpress.compress.recipe import load_recipe

    recipe = load_recipe("d2quant-w3-g64", drop=["dac", "rht"])
    assert [s.method for s in recipe.stages] == ["dsq", "gptq"] and recipe.name == "d2quant-w3-g64 [-dac, -rht]"
    with pytest.raises(RecipeError, match="no such stage"):
        load_recipe("gptq-w4", drop=["dac"])
    res = llmpress.compress(tiny_model_factory("llama"), "d2quant-w2-g64", out=tmp_path / "u", nsamples=4, seqlen=32,
                            progress=False, drop=["dac"], settings=["form=uniform"])
    loaded, _ = llmpress.load(res.out)
    down = loaded.get_submodule("model.layers.0.mlp.down_proj")
    assert isinstance(down, QuantLinear) and loaded.get_submodule("model.layers.0.mlp.up_proj").bias is None


def test_dense_export_keeps_the_correction_biases_or_refuses(tiny_model_factory, tmp_path):
    """Llama's stock config holds MLP biases (``mlp_bias``); Qwen2's cannot: an error, not a
    checkpoint whose biases transformers would silently drop."""
    from transformers import AutoModelForCausalLM

    from llmpress.io.export import ExportError, export

    llmpress.compress(tiny_model_factory("llama"), "d2quant-w3-g64", out=tmp_path / "h", nsamples=4, seqlen=32,
                      progress=False)
    with pytest.raises(ExportError, match="lm_head.bias.*--set final_norm=false"):   # no head bias in stock Llama
        export(tmp_path / "h", tmp_path / "hd", "dense")
    res = llmpress.compress(tiny_model_factory("llama"), "d2quant-w3-g64", out=tmp_path / "l", nsamples=4, seqlen=32,
                            progress=False, keep_model=True, settings=["final_norm=false"])
    export(res.out, tmp_path / "dense", "dense", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert loaded.config.mlp_bias is True
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        assert float((loaded(ids).logits - res.model(ids).logits).abs().max()) <= 1e-4
    llmpress.compress(tiny_model_factory("qwen2"), "d2quant-w3-g64", out=tmp_path / "q", nsamples=4, seqlen=32,
                      progress=False, drop=["rht"])
    with pytest.raises(ExportError, match="drop dac"):
        export(tmp_path / "q", tmp_path / "qd", "dense")
    assert not (tmp_path / "qd").exists()


@pytest.mark.parametrize("rows", [1, 5])
def test_triton_lut_gemv_with_float_scales_equals_the_torch_lut(rows, device):
    triton_bcq = pytest.importorskip("llmpress.kernels.triton_bcq")
    if triton_bcq.triton is None:
        pytest.skip("triton is not installed")
    w, h = _problem(6, out=24, inp=128)
    layer = DualScaleLinear.from_dsq(dsq_quantize(w, h, bits=2, group_size=64), None, torch.float32)
    x = torch.randn(rows, 128)
    expected = lut_gemv_scaled(x.double(), layer.sign_bits, layer.scales.double(), 64, 24)
    y = triton_bcq.scaled_gemv(x.to(device), layer.sign_bits.to(device), layer.scales.float().to(device), 64, 24,
                               config={"BLOCK_N": 16, "SPLIT_K": 2})
    torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)


def test_resume_keeps_the_corrections(tiny_model_factory, tmp_path, monkeypatch):
    """A crash inside the last block, and one after every block is done (the final norm's shift
    then comes back from the run state): both resume to the uninterrupted run's tensors."""
    from llmpress.compress import run

    from .test_pipeline import _shards, crash_then_resume

    folder = tiny_model_factory("llama")
    assert crash_then_resume(folder, "d2quant-w2-g64", tmp_path, monkeypatch) == [2]
    monkeypatch.undo()
    real = run.write_report
    monkeypatch.setattr(run, "write_report", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("crash at the end")))
    with pytest.raises(RuntimeError, match="crash at the end"):
        llmpress.compress(folder, "d2quant-w2-g64", out=tmp_path / "late", nsamples=4, seqlen=32, progress=False)
    monkeypatch.setattr(run, "write_report", real)
    llmpress.compress(folder, "d2quant-w2-g64", out=tmp_path / "late", nsamples=4, seqlen=32, progress=False, resume=True)
    whole, late = _shards(tmp_path / "whole"), _shards(tmp_path / "late")
    assert "lm_head.bias" in whole and whole.keys() == late.keys()
    assert all(torch.equal(whole[k], late[k]) for k in whole)
