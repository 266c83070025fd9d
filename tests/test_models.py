"""Any decoder: the declared maps of the newer families, the traced map of the rest, and mixtures
of experts (per-expert statistics, data-free fallback, fused checkpoints, reload and export)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

import llmpress
from llmpress.cli import app
from llmpress.compress.arch import ARCHITECTURES, arch_for
from llmpress.compress.discover import discover_arch
from llmpress.compress.recipe import parse_recipe
from llmpress.io.models import empty_model, linearize
from llmpress.kernels.dispatch import use_backend
from llmpress.layers import CompressedLinear
from llmpress.layers.experts import ExpertLinears, unfuse_experts

from .conftest import MAPPED_ARCHS, TINY_ARCHS, TRACED_ARCHS, _tiny_config


def _logits(model, seed=0):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def _skeleton(arch):
    model = empty_model(_tiny_config(arch))
    linearize(model)
    unfuse_experts(model)
    return model


@pytest.mark.parametrize("recipe", ["gptq-w4-g64", "rtn-w3-g64"])
@pytest.mark.parametrize("arch", TINY_ARCHS + MAPPED_ARCHS + TRACED_ARCHS)
def test_family_compresses_saves_and_reloads(arch, recipe, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch)
    result = llmpress.compress(folder, recipe, out=tmp_path / "out", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    reloaded, _ = llmpress.load(tmp_path / "out")
    a, b = _logits(result.model), _logits(reloaded)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # every linear of the map was compressed, experts one by one; the routers stayed dense
    skeleton = _skeleton(arch)
    arch_map = arch_for(skeleton)
    blocks = skeleton.get_submodule(arch_map.blocks)
    expected = {f"{arch_map.blocks}.{i}.{n}" for i, block in enumerate(blocks) for n in arch_map.linears_in(block)}
    assert {r.name for r in result.records} == expected
    compressed = {n for n, m in reloaded.named_modules() if isinstance(m, CompressedLinear)}
    assert compressed == expected
    dense, _ = llmpress.load(folder)
    assert (a - _logits(dense)).abs().max() > 1e-4   # it really was quantized
    if recipe == "gptq-w4-g64" and any(isinstance(m, ExpertLinears) for m in reloaded.modules()):
        # each expert's statistics came from its routed tokens: top-2 of 4 over 4x32 tokens
        experts = [r for r in result.records if ".experts." in r.name]
        per_block: dict[int, float] = {}
        for r in experts:
            if r.name.endswith("gate_proj"):
                per_block[r.block] = per_block.get(r.block, 0) + r.metrics["tokens"]
        assert set(per_block.values()) == {4 * 32 * 2}


SHIFTADD_W2 = {"stages": [{"method": "shiftadd", "bits": 2, "col_block": 8, "row_groups": 8, "terms": 3}]}


@pytest.mark.parametrize("recipe", ["svdllm-30", "rocket-30", "tt-mixed-30", "shiftadd-w2", "harp-gptq-w3-g64"])
def test_linear_level_methods_run_on_a_traced_mixture_of_experts(recipe, tiny_model_factory, tmp_path):
    """OLMoE has no declared map: its traced one serves every method that needs only linears and
    their inputs, allocators included, with each expert a linear of its own (ShiftAdd without the
    preset's fused rotation, which needs a declared map)."""
    recipe = parse_recipe(SHIFTADD_W2) if recipe == "shiftadd-w2" else recipe
    result = llmpress.compress(tiny_model_factory("olmoe"), recipe, out=tmp_path / "o", nsamples=4, seqlen=32,
                               progress=False, keep_model=True)
    assert any(".experts." in r.name for r in result.records)
    reloaded, _ = llmpress.load(tmp_path / "o")
    assert torch.equal(_logits(result.model), _logits(reloaded))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt", "phi3", "starcoder2", "mixtral", "qwen3_moe"])
def test_traced_map_finds_the_declared_groups(arch):
    model = _skeleton(arch)
    assert discover_arch(model).linear_groups == ARCHITECTURES[model.config.model_type].linear_groups


def test_traced_map_compresses_exactly_as_the_declared_one(tiny_model_factory, tmp_path, monkeypatch):
    """With Llama's entry removed, its traced map (which finds the attention for the output cache,
    but takes no residual shortcut) gives the very model the declared map gives."""
    folder = tiny_model_factory("llama")
    declared = llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "d", nsamples=4, seqlen=32, progress=False,
                                 keep_model=True)
    monkeypatch.delitem(ARCHITECTURES, "llama")
    arch = discover_arch(_skeleton("llama"))
    assert (arch.attention, arch.attention_output) == ("self_attn", "self_attn.o_proj")
    traced = llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "t", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    assert torch.equal(_logits(declared.model), _logits(traced.model))


def test_traced_map_of_parallel_attention_and_mlp():
    """GPT-NeoX runs attention and MLP side by side: both input linears are one group, both outputs the next."""
    arch = discover_arch(_skeleton("gpt_neox"))
    assert arch.discovered and arch.blocks == "gpt_neox.layers"
    assert arch.linear_groups == (("attention.query_key_value", "mlp.dense_h_to_4h"),
                                  ("attention.dense", "mlp.dense_4h_to_h"))


def test_mixed_blocks_resolve_per_block():
    """DeepSeek-V3's first block is dense, the next routed: one map, each block its own linears."""
    model = _skeleton("deepseek_v3")
    arch = arch_for(model)
    dense_block, moe_block = model.model.layers
    assert arch.groups_in(dense_block)[-2:] == (("mlp.gate_proj", "mlp.up_proj"), ("mlp.down_proj",))
    up, down = arch.groups_in(moe_block)[-2:]
    assert up == (*(f"mlp.experts.{e}.{m}" for m in ("gate_proj", "up_proj") for e in range(4)),
                  "mlp.shared_experts.gate_proj", "mlp.shared_experts.up_proj")
    assert down == (*(f"mlp.experts.{e}.down_proj" for e in range(4)), "mlp.shared_experts.down_proj")


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_unfused_experts_compute_what_the_fused_ones_do(arch, tiny_model_factory):
    fused, _ = llmpress.load(tiny_model_factory(arch))
    a = _logits(fused)
    unfuse_experts(fused)
    assert any(isinstance(m, ExpertLinears) for m in fused.modules())
    assert torch.allclose(a, _logits(fused), atol=1e-5, rtol=0)


def _starved_deepseek(tiny_model_factory, tmp_path):
    """The tiny DeepSeek-V3 with expert 3 of block 1 never picked (its selection bias far below the rest)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "starved"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("deepseek_v3"))
    model.model.layers[1].mlp.gate.e_score_correction_bias[3] = -100.0
    model.save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_model_factory("deepseek_v3")).save_pretrained(src)
    return src


def test_an_expert_without_tokens_falls_back_to_data_free(tiny_model_factory, tmp_path, capsys):
    src = _starved_deepseek(tiny_model_factory, tmp_path)
    result = llmpress.compress(src, "gptq-w4-g64", out=tmp_path / "q", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    records = {r.name: r for r in result.records}
    starved = [f"model.layers.1.mlp.experts.3.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    for name in starved:
        assert records[name].metrics["tokens"] == 0 and records[name].metrics["data_free"] == 1.0
        assert records[name].method == "rtn"
    assert all(r.metrics.get("data_free", 0.0) == 0.0 for n, r in records.items() if n not in starved)
    assert "quantized data-free" in capsys.readouterr().err
    report = json.loads((tmp_path / "q" / "llmpress-report.json").read_text())
    assert "3 data-free" in report["summary"]["experts"]
    assert "| model.layers.1.mlp.experts.3.down_proj | 0 |" in (tmp_path / "q" / "llmpress-report.md").read_text()
    assert (tmp_path / "q" / "llmpress-report-experts.png").exists()
    # the fallback is RTN on the stage's own grid: the same codes RTN W4 g64 gives that expert
    rtn = llmpress.compress(src, parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 64}]}),
                            out=tmp_path / "rtn", progress=False, keep_model=True)
    for name in starved:
        assert torch.equal(result.model.get_submodule(name).dequantize(torch.float32),
                           rtn.model.get_submodule(name).dequantize(torch.float32))
    reloaded, _ = llmpress.load(tmp_path / "q")
    assert torch.equal(_logits(result.model), _logits(reloaded))


def test_calibrate_all_experts_feeds_every_expert_every_token(tiny_model_factory, tmp_path):
    src = _starved_deepseek(tiny_model_factory, tmp_path)
    routed = llmpress.compress(src, "gptq-w4-g64", out=tmp_path / "routed", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    every = llmpress.compress(src, "gptq-w4-g64", out=tmp_path / "all", nsamples=4, seqlen=32, progress=False,
                              keep_model=True, settings=["calibrate_all_experts=true"])
    experts = [r for r in every.records if ".experts." in r.name]
    assert experts and all(r.metrics["tokens"] == 4 * 32 and not r.metrics["data_free"] for r in experts)
    # statistics only: the layers before the experts, and the router, see what they saw before
    first = {r.name: r for r in routed.records}
    for r in every.records:
        if ".experts." not in r.name and r.block == 0:
            assert r.metrics["output_error"] == first[r.name].metrics["output_error"]


def test_paired_stream_methods_on_experts_need_calibrate_all(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("qwen3_moe")
    with pytest.raises(llmpress.errors.LlmpressError, match="calibrate_all_experts"):
        llmpress.compress(folder, "gptaq-w4-g64", out=tmp_path / "g", nsamples=4, seqlen=32, progress=False)
    assert not (tmp_path / "g").exists()
    result = llmpress.compress(folder, "gptaq-w4-g64", out=tmp_path / "g", nsamples=4, seqlen=32, progress=False,
                               keep_model=True, settings=["calibrate_all_experts=true"])
    assert any("input_drift" in r.metrics for r in result.records if ".experts." in r.name)


def test_fused_expert_checkpoint_streams_like_the_per_expert_one(tiny_model_factory, tmp_path):
    """A checkpoint holding transformers 5's fused 3D experts is sliced per expert as it streams: the
    same compressed model as from the hub layout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_factory("qwen3_moe")
    model = AutoModelForCausalLM.from_pretrained(folder)
    fused = tmp_path / "fused"
    fused.mkdir()
    tied = model.config.tie_word_embeddings
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(fused)
    AutoTokenizer.from_pretrained(folder).save_pretrained(fused)
    a = llmpress.compress(folder, "gptq-w4-g64", out=tmp_path / "a", nsamples=4, seqlen=32, progress=False,
                          keep_model=True)
    b = llmpress.compress(fused, "gptq-w4-g64", out=tmp_path / "b", nsamples=4, seqlen=32, progress=False,
                          keep_model=True)
    assert torch.equal(_logits(a.model), _logits(b.model))


def test_mixtral_streams_under_its_checkpoint_names(tiny_model_factory):
    """Mixtral's hub names (block_sparse_moe.experts.<e>.w1) reach llmpress's modules without
    loading the whole model."""
    from llmpress.io.models import LazyWeights

    folder = tiny_model_factory("mixtral")
    skeleton = _skeleton("mixtral")
    store = LazyWeights(folder, renames=arch_for(skeleton).checkpoint_names)
    names = [n for n in skeleton.state_dict() if n != "lm_head.weight" or not skeleton.config.tie_word_embeddings]
    assert store.has_all(names)
    assert store.key("model.layers.1.mlp.experts.2.up_proj.weight") == "model.layers.1.block_sparse_moe.experts.2.w3.weight"


def test_moe_dense_export_loads_in_transformers(tiny_model_factory, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmpress.io.export import ExportError, export

    folder = tiny_model_factory("mixtral")
    result = llmpress.compress(folder, "gptq-w4-g64", out=tmp_path / "q", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    export(tmp_path / "q", tmp_path / "dense", "dense", dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    assert stock.model.layers[0].mlp.experts.gate_up_proj.dim() == 3   # transformers' own fused layout
    with use_backend("reference"):   # the dequantized weights in fp32, as the export holds them
        assert torch.allclose(_logits(result.model), _logits(stock), atol=1e-4, rtol=0)
    with pytest.raises(ExportError, match="routed expert"):
        export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")


@pytest.mark.parametrize("arch", ["olmo2", "granite", "starcoder2"])
def test_rotations_keep_the_function_of_the_new_dense_families(arch, tiny_model_factory, tmp_path):
    folder = tiny_model_factory(arch)
    llmpress.compress(folder, parse_recipe({"stages": [{"method": "rht"}]}), out=tmp_path / "r", progress=False)
    dense, _ = llmpress.load(folder)
    rotated, _ = llmpress.load(tmp_path / "r")
    a, b = _logits(dense), _logits(rotated)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()


@pytest.mark.parametrize("recipe", [["harp-shared-gptq-w3-g64"], ["d2quant-w3-g64", "--drop", "rht"]], ids=["harp-shared", "dac"])
def test_whole_model_methods_refuse_a_traced_map_in_one_line(recipe, tiny_model_factory, tmp_path):
    folder = tiny_model_factory("gpt_neox")
    cli = CliRunner().invoke(app, ["compress", str(folder), "--recipe", *recipe, "--out", str(tmp_path / "o"),
                                   "--nsamples", "4", "--seqlen", "32", "--no-progress"])
    assert cli.exit_code == 2, cli.output
    assert "gpt_neox has none (its linears were found by tracing)" in cli.output
    assert "Traceback" not in cli.output and not (tmp_path / "o").exists()


def test_inspect_model_shows_the_map_before_a_run(tiny_model_factory):
    cli = CliRunner().invoke(app, ["inspect-model", str(tiny_model_factory("qwen2_moe"))])
    assert cli.exit_code == 0, cli.output
    assert "qwen2_moe, declared map" in cli.output
    assert "mlp.experts.*.gate_proj" in cli.output and "4 x 48 x 64" in cli.output
    assert "mlp.gate (router)" in cli.output and "mlp.shared_expert_gate (router)" in cli.output
    traced = CliRunner().invoke(app, ["inspect-model", str(tiny_model_factory("olmoe")), "--json"])
    assert traced.exit_code == 0, traced.output
    description = json.loads(traced.output)
    assert description["map"] == "discovered" and not description["rotations"]
    assert [r["linears"] for r in description["rows"]][-2:] == [["mlp.experts.*.gate_proj", "mlp.experts.*.up_proj"],
                                                                 ["mlp.experts.*.down_proj"]]


def test_experts_in_a_layout_it_cannot_split_are_refused_not_left_dense(tiny_model_factory, tmp_path):
    cli = CliRunner().invoke(app, ["compress", str(tiny_model_factory("gpt_oss")), "--recipe", "gptq-w4-g64", "--out",
                                   str(tmp_path / "o"), "--no-progress"])
    assert cli.exit_code == 2, cli.output
    assert "model.layers.0.mlp.experts (GptOssExperts) holds its experts fused in a layout" in cli.output
    assert not (tmp_path / "o").exists()


def test_experts_split_over_statistics_passes_give_the_same_model(tiny_model_factory, tmp_path, monkeypatch):
    """With room for one expert's Hessian at a time, each expert gets its own statistics pass: the
    same statistics, so the same compressed model, with a fraction of the memory."""
    from llmpress.compress import planning

    folder = tiny_model_factory("qwen2_moe")
    whole = llmpress.compress(folder, "gptq-w4-g64", out=tmp_path / "a", nsamples=4, seqlen=32, progress=False,
                              keep_model=True)
    block = _skeleton("qwen2_moe").model.layers[0]
    group = ARCHITECTURES["qwen2_moe"].groups_in(block)[2]
    chunks = planning.split_experts(group, block, 64 * 64 * 4)
    assert [len(c) for c in chunks] == [4, 2, 2, 2]   # the shared expert's pair with expert 0, then one expert each
    monkeypatch.setattr(planning, "EXPERT_STATS_BYTES", 1)
    split = llmpress.compress(folder, "gptq-w4-g64", out=tmp_path / "b", nsamples=4, seqlen=32, progress=False,
                              keep_model=True)
    assert torch.equal(_logits(whole.model), _logits(split.model))
