"""Block-wise output tuning: exact at its starting point, never worse than it on held-out windows,
stored in the starting quantizer's own format, resumable."""

from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.compress.quant.blocktune import BlockTuneStage, TunableUniform, offsets_can_move, step_lr, window_batch
from llmpress.compress.quant.gptq import gptq_quantize
from llmpress.compress.recipe import parse_recipe
from llmpress.errors import LlmpressError
from llmpress.layers import QuantLinear

from .test_pipeline import crash_then_resume


def _recipe(steps=32, holdout=2, teacher_inputs="compressed", **tune):
    return parse_recipe({"name": "t", "stages": [
        {"method": "gptq", "bits": 3, "group_size": 32},
        {"method": "block-tune", "steps": steps, "eval_every": 4, "holdout": holdout, "teacher_inputs": teacher_inputs,
         **tune},
    ]})


@pytest.mark.parametrize("sym,act_order,columns", [(False, True, 96), (True, False, 96), (False, True, 100),
                                                    (False, False, 100)])
def test_tunable_grid_starts_at_the_quantizer_exactly(sym, act_order, columns):
    """Also with act-order's scattered groups and a ragged last group (100 columns, groups of 32),
    which the group-major layout pads."""
    torch.manual_seed(0)
    w = torch.randn(48, columns)
    x = torch.randn(512, columns) @ torch.randn(columns, columns)
    q = gptq_quantize(w, x.T @ x, bits=3, group_size=32, sym=sym, act_order=act_order)
    layer = QuantLinear.from_quantized(q, torch.randn(48), torch.float32)
    tunable = TunableUniform(layer, scale_range=0.1)
    assert torch.equal(tunable.weight().detach(), layer.dequantize(torch.float32))
    again = tunable.export()
    for name, t in layer.state_dict().items():
        assert torch.equal(t, again.state_dict()[name]), name
    # a moved state is still a grid point of the same format: codes, zeros within the grid, fp16 scales
    with torch.no_grad():
        tunable.offset.uniform_(-3, 3)
        tunable.factor.uniform_(0.5, 1.5)
        tunable.shift.uniform_(-3, 3)
    tunable.clamp_()
    moved = tunable.export()
    assert torch.equal(moved.dequantize(torch.float32), tunable.weight().detach())
    assert not torch.equal(moved.dequantize(torch.float32), layer.dequantize(torch.float32))


def test_fused_grid_weight_has_the_straight_through_gradients():
    """The fused function against the same weight built from autograd's ops (straight-through
    rounding, clamps that stop the gradient where they are active)."""
    from llmpress.compress.quant.blocktune import _GridWeight

    torch.manual_seed(0)
    codes = torch.randint(0, 8, (6, 3, 4)).float()
    zeros = torch.randint(0, 8, (6, 3)).float()
    scales = torch.rand(6, 3) + 0.1
    offset, factor, shift = (torch.rand(6, 3, 4) * 3 - 1.5).requires_grad_(), (torch.rand(6, 3) + 0.5).requires_grad_(), \
        (torch.rand(6, 3) * 4 - 2).requires_grad_()
    upstream = torch.randn(6, 3, 4)

    def ste(x, y):
        return x + (y - x).detach()

    q = ste(codes + offset, torch.round(codes + offset)).clamp(0, 7)
    z = ste(zeros + shift, torch.round(zeros + shift)).clamp(0, 7)
    s = ste(scales * factor, (scales * factor).half().float())
    reference = s.unsqueeze(-1) * (q - z.unsqueeze(-1))
    expected = torch.autograd.grad((reference * upstream).sum(), (offset, factor, shift))
    fused = _GridWeight.apply(codes, offset, scales, factor, zeros, shift, 7)
    assert torch.equal(fused, reference)
    got = torch.autograd.grad((fused * upstream).sum(), (offset, factor, shift))
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-6, atol=1e-6)


def test_block_arguments_of_one_window_give_that_windows_output(tiny_model_factory):
    """Tuning runs the block one window at a time: the sliced arguments must give exactly the rows
    the whole calibration batch gives."""
    from llmpress.compress.arch import arch_for
    from llmpress.compress.passes import capture_block_inputs

    model, _ = llmpress.load(tiny_model_factory("llama"))
    windows = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden, kwargs = capture_block_inputs(model, arch_for(model), windows, batch_size=4)
    block = model.model.layers[0]
    with torch.no_grad():
        whole = block(hidden, *kwargs[0][0][0], **kwargs[0][0][1])
        whole = whole[0] if isinstance(whole, tuple) else whole
        for i in range(4):
            args, kw = window_batch(kwargs[0][0], i, i + 1, 4)
            one = block(hidden[i:i + 1], *args, **kw)
            one = one[0] if isinstance(one, tuple) else one
            assert torch.allclose(one, whole[i:i + 1], atol=1e-6, rtol=0)


def test_block_tuning_lowers_the_held_out_error_and_never_raises_it(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    result = llmpress.compress(folder, _recipe(), out=tmp_path / "t", nsamples=16, seqlen=32, progress=False,
                               keep_model=True)
    tuned = [r.metrics for r in result.records]
    assert all(m["tune_best"] <= m["tune_start"] for m in tuned)
    report = json.loads((tmp_path / "t" / "llmpress-report.json").read_text())
    assert report["summary"]["block tuning"].startswith("3 blocks")
    assert any(m["tune_best"] < 0.99 * m["tune_start"] for m in tuned)
    # stored in GPTQ's own format; it reloads to the very same model
    reloaded, _ = llmpress.load(tmp_path / "t")
    assert all(isinstance(reloaded.get_submodule(r.name), QuantLinear) for r in result.records)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    # and it is not the untuned model
    plain = llmpress.compress(folder, parse_recipe({"stages": [{"method": "gptq", "bits": 3, "group_size": 32}]}),
                              out=tmp_path / "p", nsamples=16, seqlen=32, progress=False, keep_model=True)
    with torch.no_grad():
        assert not torch.equal(plain.model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


def test_the_linear_schedule_falls_from_lr_to_zero_and_decides_whether_codes_can_move():
    linear = BlockTuneStage(steps=200, lr=0.005, lr_schedule="linear")
    assert step_lr(linear, 1) == 0.005 and step_lr(linear, 101) == pytest.approx(0.0025)
    assert step_lr(linear, 200) == pytest.approx(0.005 / 200)
    assert all(step_lr(BlockTuneStage(steps=200, lr=0.005), k) == 0.005 for k in (1, 200))
    # signed steps move an offset by at most the sum of the step sizes: 0.5025 reaches a boundary,
    # 64 linear steps (0.1625) or 64 constant ones (0.32) do not
    assert offsets_can_move(linear)
    assert not offsets_can_move(BlockTuneStage(steps=64, lr=0.005, lr_schedule="linear"))
    assert not offsets_can_move(BlockTuneStage(steps=64, lr=0.005))
    assert offsets_can_move(BlockTuneStage(steps=64, lr=0.005, optimizer="adam"))


@pytest.mark.parametrize("optimizer", ["sign", "adam"])
def test_the_linear_schedule_tunes_too(optimizer, tiny_model_factory, tmp_path):
    result = llmpress.compress(tiny_model_factory("llama"), _recipe(lr_schedule="linear", optimizer=optimizer),
                               out=tmp_path / "t", nsamples=16, seqlen=32, progress=False)
    tuned = [r.metrics for r in result.records]
    assert all(m["tune_best"] <= m["tune_start"] for m in tuned)
    assert any(m["tune_best"] < 0.99 * m["tune_start"] for m in tuned)


@pytest.mark.parametrize("teacher_inputs", ["compressed", "full-precision"])
def test_block_tuning_resumes_identically(tiny_model_factory, tmp_path, monkeypatch, teacher_inputs):
    calls = crash_then_resume(tiny_model_factory("llama"), _recipe(steps=8, holdout=1, teacher_inputs=teacher_inputs),
                              tmp_path, monkeypatch)
    assert calls == [2]


def test_block_tuning_leaves_other_formats_of_the_block_as_they_are(tiny_model_factory, tmp_path):
    """D²Quant's blocks: the dual-scale down_proj is kept as solved, the uniform linears are tuned."""
    recipe = parse_recipe({"stages": [
        {"method": "dsq", "targets": [r"mlp\.down_proj$"], "bits": 3, "group_size": 32},
        {"method": "gptq", "bits": 3, "group_size": 32},
        {"method": "block-tune", "steps": 16, "eval_every": 4, "holdout": 2},
    ]})
    untuned = parse_recipe({"stages": recipe.model_dump(mode="json")["stages"][:2]})
    kw = dict(nsamples=16, seqlen=32, progress=False, keep_model=True)
    tuned = llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / "t", **kw)
    plain = llmpress.compress(tiny_model_factory("llama"), untuned, out=tmp_path / "p", **kw)
    first = tuned.model.model.layers[0]
    assert not isinstance(first.mlp.down_proj, QuantLinear)
    kept = plain.model.model.layers[0].mlp.down_proj.state_dict()
    assert all(torch.equal(t, kept[k]) for k, t in first.mlp.down_proj.state_dict().items())
    assert not torch.equal(first.mlp.up_proj.scales, plain.model.model.layers[0].mlp.up_proj.scales)


def test_block_tuning_refuses_grids_it_cannot_tune(tiny_model_factory, tmp_path):
    recipe = parse_recipe({"stages": [{"method": "svdllm", "ratio": 0.3}, {"method": "block-tune"}]})
    with pytest.raises(LlmpressError, match="block-tune tunes uniform grids"):
        llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / "x", nsamples=4, seqlen=32,
                          progress=False)


@pytest.mark.parametrize("teacher_inputs", ["compressed", "full-precision"])
def test_the_teacher_is_the_original_block_on_the_stream_asked_for(tiny_model_factory, tmp_path, monkeypatch,
                                                                   teacher_inputs):
    """``full-precision``: the targets are the dense model's own hidden states after the block (auto-round's
    reference); ``compressed``: the original block on the compressed stream, which differs after block 0."""
    from transformers import AutoModelForCausalLM

    from llmpress.compress.calibration import calibration_windows
    from llmpress.compress.quant.blocktune import BlockTuning
    from llmpress.io.models import load_tokenizer

    folder = tiny_model_factory("llama")
    teachers = {}
    real_start = BlockTuning.start

    def start(self, ctx):
        real_start(self, ctx)
        teachers[ctx.index] = dict(self.teacher)

    monkeypatch.setattr(BlockTuning, "start", start)
    recipe = parse_recipe({"stages": [{"method": "gptq", "bits": 3, "group_size": 32},
                                      {"method": "block-tune", "steps": 4, "eval_every": 2, "holdout": 2,
                                       "teacher_inputs": teacher_inputs}]})
    result = llmpress.compress(folder, recipe, out=tmp_path / "t", nsamples=16, seqlen=32, progress=False,
                               keep_model=True)
    assert all(r.metrics["tune_best"] <= r.metrics["tune_start"] for r in result.records)
    windows = calibration_windows(load_tokenizer(folder), "wiki/train", 16, 32, 0)
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        states = dense(input_ids=windows, output_hidden_states=True).hidden_states
    for block in (0, 1):   # (the last block's hidden state is after the final norm)
        for (b, i, _), target in teachers[block].items():
            same = torch.allclose(target[0], states[block + 1][b * 8 + i], atol=1e-4, rtol=1e-4)
            assert same == (teacher_inputs == "full-precision" or block == 0)
