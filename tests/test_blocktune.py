"""Block-wise output tuning: exact at its starting point, never worse than it on held-out windows,
stored in the starting quantizer's own format, resumable."""

from __future__ import annotations

import json

import pytest
import torch

import llmpress
from llmpress.compress.quant.blocktune import TunableUniform, window_batch
from llmpress.compress.quant.gptq import gptq_quantize
from llmpress.compress.recipe import parse_recipe
from llmpress.errors import LlmpressError
from llmpress.layers import QuantLinear

from .test_pipeline import crash_then_resume


def _recipe(steps=32, holdout=2):
    return parse_recipe({"name": "t", "stages": [
        {"method": "gptq", "bits": 3, "group_size": 32},
        {"method": "block-tune", "steps": steps, "eval_every": 4, "holdout": holdout},
    ]})


@pytest.mark.parametrize("sym,act_order", [(False, True), (True, False)])
def test_tunable_grid_starts_at_the_quantizer_exactly(sym, act_order):
    torch.manual_seed(0)
    w = torch.randn(48, 96)
    x = torch.randn(512, 96) @ torch.randn(96, 96)
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


def test_block_arguments_of_one_window_give_that_windows_output(tiny_model_factory):
    """Tuning runs the block one window at a time: the sliced arguments must give exactly the rows
    the whole calibration batch gives."""
    from llmpress.compress.arch import arch_for
    from llmpress.compress.pipeline import capture_block_inputs

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


def test_block_tuning_resumes_identically(tiny_model_factory, tmp_path, monkeypatch):
    calls = crash_then_resume(tiny_model_factory("llama"), _recipe(steps=8, holdout=1), tmp_path, monkeypatch)
    assert calls == [2]


def test_block_tuning_refuses_grids_it_cannot_tune(tiny_model_factory, tmp_path):
    recipe = parse_recipe({"stages": [{"method": "svdllm", "ratio": 0.3}, {"method": "block-tune"}]})
    with pytest.raises(LlmpressError, match="block-tune tunes uniform grids"):
        llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / "x", nsamples=4, seqlen=32,
                          progress=False)
