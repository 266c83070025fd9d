"""End to end on tiny random models: compress, save, reload, compare; resume; output shortcut."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

import llmpress
from llmpress.compress import pipeline, shortcuts
from llmpress.compress.recipe import parse_recipe
from llmpress.layers import QuantLinear

from .conftest import TINY_ARCHS


def _gptq(bits=4, group=32, **extra):
    return parse_recipe({"name": "t", "stages": [{"method": "gptq", "bits": bits, "group_size": group, **extra}]})


def _logits(model, seed=0):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _shards(folder):
    tensors = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_compress_save_load_gives_the_same_logits(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch)
    result = llmpress.compress(folder, _gptq(), out=tmp_path / "out", nsamples=4, seqlen=32,
                               progress=False, keep_model=True)
    n_linears = sum(isinstance(m, QuantLinear) for m in result.model.modules())
    assert n_linears == len(result.records) > 0
    reloaded, _ = llmpress.load(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == n_linears
    a, b = _logits(result.model), _logits(reloaded)
    assert torch.isfinite(a).all()
    assert (a - b).abs().max() <= 1e-5
    dense, _ = llmpress.load(folder)
    assert (a - _logits(dense)).abs().max() > 1e-4       # it really was quantized
    for name in ("llmpress-report.json", "llmpress-report.md", "llmpress-report.png", "llmpress-recipe.yaml",
                 "model.safetensors.index.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).exists(), name


def test_rtn_needs_no_calibration_and_reloads(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    recipe = parse_recipe({"stages": [{"method": "rtn", "bits": 3, "group_size": 32}]})
    result = llmpress.compress(folder, recipe, out=tmp_path / "o", progress=False, keep_model=True,
                               calib=None)
    reloaded, _ = llmpress.load(tmp_path / "o")
    assert (_logits(result.model) - _logits(reloaded)).abs().max() <= 1e-5


def test_dense_tensors_are_stored_in_the_source_precision(tiny_model_factory, tmp_path):
    """``dtype="auto"``: an fp16 checkpoint's embeddings, norms and head are saved as fp16, not as
    the fp32 they are computed in, rotated ones too; the compressed modules' own tensors keep their
    format's dtypes; the untouched ones reload to the in-memory model exactly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "half"
    AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama"), dtype=torch.float16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_model_factory("llama")).save_pretrained(src)
    recipe = parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 32}]})
    result = llmpress.compress(src, recipe, out=tmp_path / "o", progress=False, keep_model=True)
    saved = _shards(tmp_path / "o")
    assert saved["model.embed_tokens.weight"].dtype == torch.float16
    assert saved["model.layers.0.input_layernorm.weight"].dtype == torch.float16
    assert saved["model.layers.0.mlp.up_proj.qweight"].dtype == torch.int32
    reloaded, _ = llmpress.load(tmp_path / "o")
    assert torch.equal(_logits(result.model), _logits(reloaded))
    rotated = parse_recipe({"stages": [{"method": "rht"}, {"method": "rtn", "bits": 4, "group_size": 32}]})
    llmpress.compress(src, rotated, out=tmp_path / "r", progress=False)
    assert _shards(tmp_path / "r")["model.embed_tokens.weight"].dtype == torch.float16
    llmpress.compress(src, rotated, out=tmp_path / "r32", progress=False, dtype="float32")
    assert _shards(tmp_path / "r32")["model.embed_tokens.weight"].dtype == torch.float32


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dense_dtype_is_storage_only(dtype, tiny_model_factory, tmp_path):
    """An fp32 source stored with ``dtype``: every tensor outside the compressed modules is in
    ``dtype``, the packed codes and scales are the fp32 run's bit for bit, the config and the
    manifest say so, and the reloaded logits differ from the fp32 run's only by that rounding."""
    folder = tiny_model_factory("llama")
    recipe = parse_recipe({"stages": [{"method": "gptq", "bits": 4, "group_size": 32, "ignore": [r"layers\.0\.mlp\.up_proj"]}]})
    runs = {}
    for name in ("float32", dtype):
        llmpress.compress(folder, recipe, out=tmp_path / name, nsamples=4, seqlen=32, progress=False, dtype=name)
        runs[name] = _shards(tmp_path / name)
    wide, narrow = runs["float32"], runs[dtype]
    assert wide.keys() == narrow.keys()
    packed = ("qweight", "qzeros", "scales", "g_idx")
    for key in wide:
        if key.endswith(packed):
            assert torch.equal(wide[key], narrow[key]), key
        elif wide[key].is_floating_point():
            assert wide[key].dtype == torch.float32 and narrow[key].dtype == getattr(torch, dtype), key
            assert torch.equal(wide[key].to(narrow[key].dtype), narrow[key]), key
    assert narrow["model.layers.0.mlp.up_proj.weight"].dtype == getattr(torch, dtype)   # an ignored linear
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config["dtype"] == dtype and config["quantization_config"]["dense_dtype"] == dtype
    a, b = _logits(llmpress.load(tmp_path / "float32")[0]), _logits(llmpress.load(tmp_path / dtype)[0])
    assert not torch.equal(a, b) and (a - b).abs().max() <= 0.05 * a.abs().max()


def test_auto_dtype_of_each_source(real_model_folder):
    from transformers import AutoConfig

    from llmpress.errors import ModelLoadError
    from llmpress.io.models import storage_dtype

    config = AutoConfig.from_pretrained(real_model_folder)
    assert config.dtype == torch.float32   # the converted cache: not the source's precision
    assert storage_dtype("auto", "smollm2-135m", config) == torch.float16   # its GGUF embedding is Q8_0
    assert storage_dtype("auto", str(real_model_folder), config) == torch.float32
    config.dtype = torch.bfloat16
    assert storage_dtype("auto", str(real_model_folder), config) == torch.bfloat16
    assert storage_dtype("float16", str(real_model_folder), config) == torch.float16
    with pytest.raises(ModelLoadError, match="--dtype must be"):
        storage_dtype("half", str(real_model_folder), config)


def _with_and_without(folder, tmp_path, monkeypatch, **arch_changes):
    """Shards of a GPTQ W3 run as shipped, and of one with the architecture map changed."""
    llmpress.compress(folder, _gptq(bits=3), out=tmp_path / "default", nsamples=4, seqlen=32, progress=False)
    from llmpress.compress import run

    original = run.arch_for
    monkeypatch.setattr(run, "arch_for", lambda m: dataclasses.replace(original(m), **arch_changes))
    llmpress.compress(folder, _gptq(bits=3), out=tmp_path / "changed", nsamples=4, seqlen=32, progress=False)
    default, changed = _shards(tmp_path / "default"), _shards(tmp_path / "changed")
    assert default.keys() == changed.keys()
    return default, changed


def test_residual_output_shortcut_equals_a_real_forward(tiny_model_factory, tmp_path, monkeypatch):
    """h + X Ŵᵀ + b must give the next block the same inputs as running the compressed block."""
    fast, slow = _with_and_without(tiny_model_factory("llama"), tmp_path, monkeypatch, residual_linear=None)
    for k in fast:
        if k.endswith("qweight"):
            # identical up to float rounding: allow a handful of codes to flip a rounding tie
            assert (fast[k] != slow[k]).float().mean() < 0.01, k
        elif fast[k].is_floating_point():
            assert torch.allclose(fast[k].float(), slow[k].float(), rtol=1e-3, atol=1e-4), k


def crash_then_resume(folder, recipe, tmp_path, monkeypatch, **options) -> list[int]:
    """Compress ``folder`` whole, and again with a crash at block 2 then ``--resume``; checks that
    the crashed folder is not presented as complete and the resumed one equals the whole run
    tensor for tensor. Returns the blocks the resumed run compressed."""
    llmpress.compress(folder, recipe, out=tmp_path / "whole", nsamples=4, seqlen=32, progress=False, **options)
    real = pipeline._compress_block

    def crash_on_block_2(ctx, *args, **kwargs):
        if ctx.index == 2:
            raise RuntimeError("simulated crash")
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_compress_block", crash_on_block_2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        llmpress.compress(folder, recipe, out=tmp_path / "part", nsamples=4, seqlen=32, progress=False, **options)
    assert not (tmp_path / "part" / "config.json").exists()       # not presented as complete
    with pytest.raises(llmpress.api.ModelLoadError, match="incomplete"):
        llmpress.load(tmp_path / "part")
    calls = []
    monkeypatch.setattr(pipeline, "_compress_block", lambda ctx, *a, **k: calls.append(ctx.index) or real(ctx, *a, **k))
    llmpress.compress(folder, recipe, out=tmp_path / "part", nsamples=4, seqlen=32, progress=False, resume=True,
                      **options)
    whole, resumed = _shards(tmp_path / "whole"), _shards(tmp_path / "part")
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    return calls


def test_resume_after_a_crash_gives_identical_tensors(tiny_model_factory, tmp_path, monkeypatch):
    calls = crash_then_resume(tiny_model_factory("llama"), _gptq(bits=3), tmp_path, monkeypatch)
    assert calls == [2]                                            # blocks 0 and 1 were not redone


def test_resume_refuses_a_different_recipe(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    llmpress.compress(folder, _gptq(bits=3), out=tmp_path / "o", nsamples=4, seqlen=32, progress=False)
    with pytest.raises(llmpress.errors.OutputError, match="another model, recipe"):
        llmpress.compress(folder, _gptq(bits=4), out=tmp_path / "o", nsamples=4, seqlen=32, progress=False,
                          resume=True)


def test_non_true_sequential_and_overrides(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen2")
    recipe = parse_recipe({"stages": [{"method": "gptq", "bits": 3, "group_size": 32, "true_sequential": False,
                                       "act_order": False, "overrides": {"down_proj": {"bits": 8}},
                                       "ignore": [r"layers\.0\.self_attn\.q_proj"]}]})
    result = llmpress.compress(folder, recipe, out=tmp_path / "o", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    bits = {r.name: r.bits for r in result.records}
    assert "model.layers.0.self_attn.q_proj" not in bits
    assert bits["model.layers.1.mlp.down_proj"] == 8 and bits["model.layers.1.mlp.up_proj"] == 3
    reloaded, _ = llmpress.load(tmp_path / "o")
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert (_logits(result.model) - _logits(reloaded)).abs().max() <= 1e-5


@pytest.mark.parametrize("arch", ["llama", "opt", "gpt2", "gemma3"])
def test_cached_attention_output_changes_nothing(arch, tiny_model_factory, tmp_path, monkeypatch):
    """Later stages reuse the compressed attention's output; the result must be bit-identical."""
    cached, plain = _with_and_without(tiny_model_factory(arch), tmp_path, monkeypatch, attention_output=None)
    for k in cached:
        assert torch.equal(cached[k], plain[k]), k


def test_bf16_activations_halve_the_streams_and_move_the_result_little(tiny_model_factory, tmp_path, monkeypatch):
    """bf16 storage of the streams (two for GPTAQ) and of the attention cache: half the bytes, the
    attention cache still verified on every stage (never replaced by the real attention), codes
    close to the fp32 run's; and a run cannot resume the other's folder."""
    folder = tiny_model_factory("llama")
    mismatches = []
    real_forward = shortcuts.CachedAttention.forward

    def counting(self, *args, **kwargs):
        try:
            return real_forward(self, *args, **kwargs)
        except shortcuts.AttentionCacheMismatch:
            mismatches.append(self)
            raise

    monkeypatch.setattr(shortcuts.CachedAttention, "forward", counting)
    runs = {}
    for kind in ("float32", "bfloat16"):
        runs[kind] = llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / kind, nsamples=8, seqlen=32,
                                       progress=False, activations=kind)
    assert not mismatches
    assert "2 fp32 activation stream(s)" in runs["float32"].summary["memory plan"]
    assert "2 bf16 activation stream(s)" in runs["bfloat16"].summary["memory plan"]
    plans = [pipeline.plan_memory(128, 512, 576, 1, 0, 1 << 40, size) for size in (4, 2)]
    assert plans[0].stream_bytes == 2 * plans[1].stream_bytes == 128 * 512 * 576 * 4
    fp32, bf16 = _shards(tmp_path / "float32"), _shards(tmp_path / "bfloat16")
    assert fp32.keys() == bf16.keys() and any(not torch.equal(fp32[k], bf16[k]) for k in fp32)
    # 3-bit GPTQ on a random model flips many codes for any change of H: compare the solves' own
    # output errors instead, which bf16 inputs must not make worse
    errors = {kind: sum(r.metrics["output_error"] for r in run.records) for kind, run in runs.items()}
    assert 0.8 < errors["bfloat16"] / errors["float32"] < 1.2, errors
    with pytest.raises(llmpress.errors.OutputError, match="another model, recipe"):
        llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "float32", nsamples=8, seqlen=32, progress=False,
                          activations="bfloat16", resume=True)
    with pytest.raises(llmpress.errors.RecipeError, match="activations must be one of"):
        llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "x", activations="int8", progress=False)


def test_bf16_forward_passes_keep_the_shortcuts_exact_and_move_the_result_little(tiny_model_factory, tmp_path,
                                                                                  monkeypatch):
    """Forward passes under bf16 autocast: the attention cache and the output shortcut give exactly
    what real forwards under it give, a killed run resumes to the same tensors, the solves' output
    errors stay near the fp32 run's, and a folder of one precision does not resume with the other."""
    folder = tiny_model_factory("llama")
    runs = {kind: llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / kind, nsamples=8, seqlen=32,
                                    progress=False, forward_dtype=kind) for kind in ("float32", "bfloat16")}
    assert runs["bfloat16"].summary["forward passes in"] == "bfloat16 (autocast)"
    assert "forward passes in" not in runs["float32"].summary
    fp32, bf16 = _shards(tmp_path / "float32"), _shards(tmp_path / "bfloat16")
    assert fp32.keys() == bf16.keys() and any(not torch.equal(fp32[k], bf16[k]) for k in fp32)   # autocast ran
    errors = {kind: sum(r.metrics["output_error"] for r in run.records) for kind, run in runs.items()}
    assert 0.8 < errors["bfloat16"] / errors["float32"] < 1.2, errors

    from llmpress.compress import run

    original = run.arch_for
    monkeypatch.setattr(run, "arch_for", lambda m: dataclasses.replace(original(m), attention_output=None,
                                                                       residual_linear=None))
    llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "plain", nsamples=8, seqlen=32, progress=False,
                      forward_dtype="bfloat16")
    monkeypatch.setattr(run, "arch_for", original)
    plain = _shards(tmp_path / "plain")
    for k in bf16:
        assert torch.equal(bf16[k], plain[k]), k
    assert crash_then_resume(folder, "gptaq-w3-g64", tmp_path / "resume", monkeypatch,
                             forward_dtype="bfloat16") == [2]
    with pytest.raises(llmpress.errors.OutputError, match="another model, recipe"):
        llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "float32", nsamples=8, seqlen=32, progress=False,
                          forward_dtype="bfloat16", resume=True)
    with pytest.raises(llmpress.errors.RecipeError, match="forward_dtype must be one of"):
        llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "x", forward_dtype="float16", progress=False)


def test_memory_plan_puts_streams_on_the_device_where_they_fit():
    from llmpress.devices import to_device

    mb = 1 << 20
    stream = 128 * 512 * 576 * 4   # 144 MB
    # half the device's free memory, less three copies of the block, is the streams' share
    roomy = pipeline.plan_memory(128, 512, 576, 2, 10 * mb, 1 << 40, 4, device_free=2 * (2 * stream + 30 * mb))
    assert roomy.on_device == [True, True] and roomy.device_budget == 2 * stream
    assert "(device, device)" in roomy.describe() and roomy.predicted_peak == stream + 30 * mb   # the cache
    one = pipeline.plan_memory(128, 512, 576, 2, 10 * mb, 1 << 40, 4, device_free=2 * (stream + 30 * mb))
    assert one.on_device == [True, False] and one.on_disk == [False, False] and "(device, RAM)" in one.describe()
    # what fits neither the device nor the RAM budget goes to disk
    tight = pipeline.plan_memory(128, 512, 576, 2, 10 * mb, 2 * stream + 29 * mb, 4, device_free=2 * (stream + 30 * mb))
    assert tight.on_device == [True, False] and tight.on_disk == [False, True]
    cpu = pipeline.plan_memory(128, 512, 576, 2, 10 * mb, 1 << 40, 4)
    assert cpu.on_device == [False, False] and "device" not in cpu.describe()
    # a block's call arguments reach its device through tuples, lists and dicts, the rest untouched
    args = ((torch.ones(2), [torch.zeros(1), None]), {"mask": torch.ones(1, 2), "flag": True})
    moved = to_device(args, torch.device("cpu"))
    assert moved[1]["flag"] is True and moved[0][1][1] is None and torch.equal(moved[1]["mask"], args[1]["mask"])
