"""Exports: what other tools load must compute what llmpress computes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import llmpress
from llmpress.cli import app
from llmpress.compress.recipe import parse_recipe
from llmpress.io.export import ExportError, export
from llmpress.layers import QuantLinear


def _compress(folder, tmp_path, name, **stage):
    recipe = parse_recipe({"stages": [{"method": "gptq", "act_order": False, **stage}]})
    out = tmp_path / name
    llmpress.compress(folder, recipe, out=out, nsamples=4, seqlen=32, progress=False)
    model, _ = llmpress.load(out)
    return out, model


def _logits(model):
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _quantized(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("stage", [
    dict(bits=4, group_size=32, sym=True), dict(bits=8, group_size=-1, sym=True),
    dict(bits=4, group_size=32, sym=True, overrides={"down_proj": {"bits": 8}}, ignore=["layers.0.self_attn.q_proj"]),
])
def test_compressed_tensors_export_loads_in_transformers(stage, tiny_model_factory, tmp_path):
    pytest.importorskip("compressed_tensors")
    from transformers import AutoModelForCausalLM

    src, model = _compress(tiny_model_factory("llama"), tmp_path, "q", **stage)
    export(src, tmp_path / "ct", "compressed-tensors", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    a, b = _logits(model), _logits(loaded)
    assert (a - b).abs().max() <= 1e-3 * a.abs().max()


@pytest.mark.parametrize("preset", [None, "gptq-w3-g64"])
def test_compressed_tensors_asymmetric_decompresses_with_its_own_code(preset, tiny_model_factory, tmp_path):
    """Asymmetric exports hold the zero points packed along the output dimension, as llm-compressor
    writes them and vLLM reads them. transformers 5.x cannot load such files (it allocates them
    unpacked: llm-compressor#1618), so the check goes through compressed-tensors' own decompressor.
    gptq-w3-g64 (act-order with static groups) exports as it is."""
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    if preset is None:
        src, model = _compress(tiny_model_factory("qwen2"), tmp_path, "q", bits=3, group_size=32)
    else:
        src = tmp_path / "q"
        llmpress.compress(tiny_model_factory("qwen2"), preset, out=src, nsamples=4, seqlen=32, progress=False,
                          settings=["group_size=32"])   # the tiny model's 160 MLP channels
        model, _ = llmpress.load(src)
    export(src, tmp_path / "ct", "compressed-tensors", dtype="float32")
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate({"targets": ["Linear"], **{
        k: v for k, v in config["config_groups"]["group_0"].items() if k in ("weights", "input_activations")}})
    for name, module in _quantized(model).items():
        state = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".weight")}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        assert torch.equal(weight.float(), module.dequantize(torch.float32)), name


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_export_unpacks_to_the_same_weights(sym, tiny_model_factory, tmp_path):
    """Symmetric models are written as v1 (zeros stored minus one), asymmetric ones as gptq_v2
    (zeros as they are, the layout GPTQModel and vLLM accept for them)."""
    src, model = _compress(tiny_model_factory("llama"), tmp_path, "q", bits=4, group_size=32, act_order=True, sym=sym)
    export(src, tmp_path / "gptq", "gptq")
    tensors = load_file(tmp_path / "gptq" / "model.safetensors")
    qconfig = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    layout = "gptq" if sym else "gptq_v2"
    assert qconfig["checkpoint_format"] == qconfig["format"] == layout
    assert qconfig["desc_act"] is True and qconfig["bits"] == 4 and qconfig["sym"] is sym
    for name, module in _quantized(model).items():
        weight = _unpack_gptq(tensors, name, bits=4, zero_offset=1 if sym else 0)
        assert torch.equal(weight, module.dequantize(torch.float32)), name


def _unpack_gptq(tensors, name, bits, zero_offset):
    """A GPTQ reader written from the format's description, sharing no code with the writer:
    ``32/bits`` codes per int32 word, lowest bits first; v1 stores zeros minus one, v2 as they are."""
    qweight, qzeros = tensors[f"{name}.qweight"].long() & 0xFFFFFFFF, tensors[f"{name}.qzeros"].long() & 0xFFFFFFFF
    scales, g_idx = tensors[f"{name}.scales"].float(), tensors[f"{name}.g_idx"].long()
    per_word, mask = 32 // bits, (1 << bits) - 1
    shifts = torch.arange(per_word) * bits
    codes = ((qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask).reshape(-1, qweight.shape[1])   # [in, out]
    zeros = ((qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask).reshape(qzeros.shape[0], -1)     # [groups, out]
    zeros = zeros + zero_offset
    return (scales[g_idx] * (codes - zeros[g_idx]).float()).T


def test_dense_export_loads_anywhere(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = _compress(tiny_model_factory("opt"), tmp_path, "q", bits=3, group_size=32)
    export(src, tmp_path / "dense", "dense", dtype="float32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    assert (_logits(model) - _logits(loaded)).abs().max() <= 1e-4


def test_exports_refuse_what_they_cannot_express(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    src, _ = _compress(folder, tmp_path, "actorder", bits=4, group_size=32, act_order=True)
    with pytest.raises(ExportError, match="static_groups=true"):
        export(src, tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()
    mixed = parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 32,
                                      "overrides": {"down_proj": {"bits": 8}}}]})
    llmpress.compress(folder, mixed, out=tmp_path / "mixed", progress=False)
    with pytest.raises(ExportError, match="one bit width"):
        export(tmp_path / "mixed", tmp_path / "g", "gptq")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    result = CliRunner().invoke(app, ["export", str(src), "--format", "dense", "--out", str(tmp_path / "mine"),
                                      "--overwrite"])
    assert result.exit_code == 2 and "refusing to overwrite" in result.output
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    result = CliRunner().invoke(app, ["export", str(folder), "--format", "dense", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "not an llmpress output folder" in result.output
