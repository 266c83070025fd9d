"""The command line: every bad input ends in one line, exit code 2, and no folder that looks complete."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from llmpress.cli import app

runner = CliRunner()


def _run(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, (result.stderr or "").strip()


def _assert_user_error(result, stderr, pattern):
    import re

    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert stderr.count("\n") == 0, stderr          # exactly one line
    assert stderr.startswith("error:") and re.search(pattern, stderr), stderr


def test_missing_model_path(tmp_path):
    result, stderr = _run("compress", tmp_path / "nope", "--recipe", "rtn-w4", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"no model at")
    assert not (tmp_path / "o").exists()


def test_unknown_recipe_key_suggests_the_closest(tiny_model_factory, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - method: gptq\n    bits: 4\n    gruop_size: 64\n")
    result, stderr = _run("compress", tiny_model_factory("llama"), "--recipe", recipe, "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"unknown key 'gruop_size'.*did you mean 'group_size'")
    assert not (tmp_path / "o").exists()


def test_a_family_without_a_map_compresses_through_the_traced_one(tmp_path, smol_tokenizer):
    from transformers import AutoModelForCausalLM, PhiConfig, T5Config

    folder = tmp_path / "phi"
    AutoModelForCausalLM.from_config(PhiConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, vocab_size=49152)).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    result, stderr = _run("compress", folder, "--recipe", "gptq-w4", "--out", tmp_path / "o", "--nsamples", "2",
                          "--seqlen", "16", "--no-progress")
    assert result.exit_code == 0, stderr
    report = json.loads((tmp_path / "o" / "llmpress-report.json").read_text())
    assert {r["module"].rsplit(".", 2)[-2] + "." + r["module"].rsplit(".", 1)[-1] for r in report["modules"]} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense", "mlp.fc1", "mlp.fc2"}
    # a model transformers cannot build as a causal LM is refused in one line
    t5 = tmp_path / "t5"
    t5.mkdir()
    T5Config(d_model=32, num_layers=1, vocab_size=49152).save_pretrained(t5)
    smol_tokenizer.save_pretrained(t5)
    result, stderr = _run("compress", t5, "--recipe", "gptq-w4", "--out", tmp_path / "t")
    _assert_user_error(result, stderr, r"cannot build a model from")
    assert not (tmp_path / "t").exists()


def test_existing_output_folder_is_kept_without_overwrite(tiny_model_factory, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "precious.txt").write_text("mine")
    result, stderr = _run("compress", tiny_model_factory("llama"), "--recipe", "rtn-w4", "--out", out)
    _assert_user_error(result, stderr, r"already exists; pass --overwrite")
    # --overwrite never deletes a folder llmpress did not write
    result, stderr = _run("compress", tiny_model_factory("llama"), "--recipe", "rtn-w4", "--out", out, "--overwrite")
    _assert_user_error(result, stderr, r"not an llmpress output folder")
    assert (out / "precious.txt").read_text() == "mine"


def test_corrupt_safetensors(tiny_model_factory, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_model_factory("llama"), folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result, stderr = _run("compress", folder, "--recipe", "rtn-w4", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"corrupt or unreadable safetensors file .*model.safetensors")
    assert not (tmp_path / "o").exists()
    result, stderr = _run("eval", folder, "--windows", "1")
    _assert_user_error(result, stderr, r"model")


def test_nan_weights_are_refused(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(tiny_model_factory("llama"), folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    result, stderr = _run("compress", folder, "--recipe", "rtn-w4", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"model.layers.0.mlp.up_proj: the weight has NaN or Inf")
    assert not (tmp_path / "o" / "config.json").exists()


def test_compress_inspect_eval_recipes(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    out = tmp_path / "o"
    result, _ = _run("compress", folder, "--recipe", "gptq-w4", "--out", out, "--nsamples", "4", "--seqlen", "32",
                     "--no-progress", "--set", "act_order=false")
    assert result.exit_code == 0, result.output
    assert "saved to" in result.output
    result, _ = _run("inspect", out)
    assert result.exit_code == 0 and "uniform" in result.output and "bits per weight" in result.output
    result, _ = _run("eval", out, "--dataset", "news", "--seqlen", "64", "--windows", "2", "--no-progress",
                     "--device", "cpu")
    assert result.exit_code == 0 and "ppl[news, 64x2] = " in result.output
    result, _ = _run("eval", out, "--decode", "4")   # the compressed model, then its dense source
    lines = [line for line in result.output.splitlines() if "tok/s" in line]
    assert result.exit_code == 0 and len(lines) == 2 and str(folder) in lines[1], result.output
    assert all("decode[wiki/test 32-token prompt, 4 new, batch 1," in line for line in lines)
    assert re.search(r"speed-up: \d+\.\d\dx", result.output)
    result, _ = _run("eval", out, "--decode", "4", "--compile")   # both through a compiled step
    lines = [line for line in result.output.splitlines() if "tok/s" in line]
    assert result.exit_code == 0 and len(lines) == 2, result.output
    assert all("batch 1, " in line and ", compiled] = " in line for line in lines)
    result, _ = _run("recipes")
    assert result.exit_code == 0 and "gptq-w3-g64" in result.output
    result, stderr = _run("inspect", tmp_path)
    _assert_user_error(result, stderr, r"no config.json")


def test_a_device_the_machine_lacks_is_one_line_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for spec, pattern in (("cuda", r"no CUDA device is available"), ("cuda:1", r"no CUDA device"),
                          ("tpu", r"choose auto, cpu, cuda or cuda:N")):
        result, stderr = _run("eval", tmp_path / "missing", "--device", spec)   # the model is never looked for
        _assert_user_error(result, stderr, pattern)
    result, stderr = _run("generate", tmp_path / "missing", "--prompt", "hi", "--device", "cuda")
    _assert_user_error(result, stderr, r"no CUDA device is available")
    out = tmp_path / "out"
    result, stderr = _run("compress", "smollm2-135m", "--recipe", "gptq-w4-g64", "--out", out, "--device", "cuda")
    _assert_user_error(result, stderr, r"no CUDA device is available")
    assert not out.exists()   # nothing was read or written


def test_devices_resolve_to_what_the_machine_has(monkeypatch):
    from llmpress.devices import resolve_device
    from llmpress.errors import SettingsError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device(" CPU ") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(SettingsError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(SettingsError, match="choose"):
        resolve_device("cuda:x")


def test_module_entry_point_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llmpress", "eval", str(tmp_path / "missing")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no model at" in proc.stderr


def test_tampered_manifest_is_refused(tiny_model_factory, tmp_path):
    import json

    import llmpress

    out = tmp_path / "o"
    llmpress.compress(tiny_model_factory("llama"), "rtn-w4", out=out, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["params"]["bits"] = 3
    (out / "config.json").write_text(json.dumps(cfg))
    result, stderr = _run("eval", out, "--windows", "1")
    _assert_user_error(result, stderr, r"up_proj.*shape")
    assert torch.__version__


def test_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result, stderr = _run("eval", "no-such-org/no-such-model", "--windows", "1")
    _assert_user_error(result, stderr, r"cannot fetch 'no-such-org/no-such-model' from the Hugging Face Hub")


def test_drop_removes_a_stage_and_inspect_shows_dual_scale(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    result, stderr = _run("compress", model, "--recipe", "d2quant-w2-g64", "--drop", "harp", "--out", tmp_path / "x")
    _assert_user_error(result, stderr, r"--drop harp: the recipe has no such stage")
    assert not (tmp_path / "x").exists()
    result, _ = _run("compress", model, "--recipe", "d2quant-w2-g64", "--drop", "dac", "--drop", "rht",
                     "--out", tmp_path / "o", "--nsamples", "4", "--seqlen", "32", "--no-progress")
    assert result.exit_code == 0, result.output
    result, _ = _run("inspect", tmp_path / "o")
    words = result.output.split()   # the table may wrap its cells on a narrow terminal
    assert result.exit_code == 0 and "dual-scale" in words and "absorbed" in words, result.output
    assert "d2quant-w2-g64 [-dac, -rht]" in " ".join(words)


def test_report_bits_per_weight_is_weighted_by_module_size(tiny_model_factory, tmp_path):
    import llmpress

    out = tmp_path / "o"
    result = llmpress.compress(tiny_model_factory("llama"), "gptq-w4-g64", out=out, nsamples=4, seqlen=32,
                               progress=False)
    model, _tokenizer = llmpress.load(out)
    packed = [m for m in model.modules() if hasattr(m, "stored_bits")]
    bits = [m.stored_bits() for m in packed]
    weights = [m.in_features * m.out_features for m in packed]
    per_module = [b / w for b, w in zip(bits, weights)]
    assert len(set(weights)) > 1 and max(per_module) - min(per_module) > 1e-3   # act-order g_idx: shapes differ
    assert result.summary["bits per weight (codes+scales+zeros)"] == round(sum(bits) / sum(weights), 4)
    assert abs(sum(bits) / sum(weights) - sum(per_module) / len(per_module)) > 1e-4   # not the plain mean


def _text_file(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    from llmpress.io.text import load_text

    path.write_text(load_text("news")[:20_000])
    return path


def test_text_paths_that_look_like_markup_are_shown_as_given(tiny_model_factory, tmp_path):
    """A text source at an absolute path ("[/...]" reads as a closing tag) or under "run[x]" (reads
    as a style) is evaluated and calibrated on with progress bars on, and printed verbatim."""
    model = tiny_model_factory("llama")
    for text in (_text_file(tmp_path / "t.txt"), _text_file(tmp_path / "run[x]" / "t.txt")):
        assert text.is_absolute()
        result, _ = _run("eval", model, "--dataset", text, "--seqlen", "64", "--windows", "1")
        assert result.exit_code == 0, (result.output, result.exception)
        assert f"ppl[{text}, 64x1] = " in result.output
        out = tmp_path / f"o{len(text.parts)}"
        result, _ = _run("compress", model, "--recipe", "gptq-w4-g64", "--calib", text, "--out", out,
                         "--nsamples", "4", "--seqlen", "32")
        assert result.exit_code == 0, (result.output, result.exception)
        assert f"saved to {out}" in result.output
        import json

        assert json.loads((out / "config.json").read_text())["quantization_config"]["calibration"]["source"] == str(text)


def test_calibration_source_is_checked_when_the_recipe_reads_none(tiny_model_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = tiny_model_factory("llama")
    result, stderr = _run("compress", model, "--recipe", "rtn-w4", "--calib", tmp_path / "nope.txt", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"no such text source .*nope.txt")
    result, stderr = _run("compress", model, "--recipe", "rtn-w4", "--calib", "hf:nonexistent/dataset", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"cannot find hub dataset 'nonexistent/dataset'")
    assert not (tmp_path / "o").exists()
    text = _text_file(tmp_path / "t.txt")
    result, stderr = _run("compress", model, "--recipe", "rtn-w4", "--calib", text, "--out", tmp_path / "o", "--no-progress")
    assert result.exit_code == 0, result.output
    assert stderr.count("is unused: recipe rtn-w4 needs no calibration data") == 1, stderr


def _broken_config(model, tmp_path, **changes):
    import json

    folder = tmp_path / "broken"
    shutil.copytree(model, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_config_transformers_cannot_build_is_one_line(tiny_model_factory, tmp_path):
    model = tiny_model_factory("llama")
    folder = _broken_config(model, tmp_path / "a", hidden_size=66)     # config validation rejects it
    for command in (("compress", folder, "--recipe", "rtn-w4", "--out", tmp_path / "o"), ("eval", folder, "--windows", "1")):
        result, stderr = _run(*command)
        _assert_user_error(result, stderr, r"hidden size \(66\) is not a multiple of the number of attention heads")
        assert str(folder) in stderr
    folder = _broken_config(model, tmp_path / "b", hidden_act="no-such-activation")   # fails only when built
    result, stderr = _run("compress", folder, "--recipe", "rtn-w4", "--out", tmp_path / "o")
    _assert_user_error(result, stderr, r"cannot build a model from .*broken/config.json: KeyError")
    result, stderr = _run("eval", folder, "--windows", "1")
    _assert_user_error(result, stderr, r"cannot load the model in .*broken")
    assert not (tmp_path / "o").exists()


def test_inspect_folds_blocks_and_lists_every_module_on_request(tiny_model_factory, tmp_path):
    import json

    import llmpress
    from llmpress.compress.recipe import parse_recipe

    recipe = parse_recipe({"stages": [{"method": "rtn", "bits": 4, "group_size": 32,
                                       "overrides": {r"layers\.1\.mlp\.down_proj": {"bits": 8}}}]})
    out = tmp_path / "o"
    llmpress.compress(tiny_model_factory("llama"), recipe, out=out, progress=False)   # 3 blocks
    result = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    table = lines[:next(i for i, line in enumerate(lines) if line.startswith("recipe:"))]
    assert max(len(line) for line in table) <= 80
    rows = [line.split() for line in lines if "uniform" in line]
    assert ["0-2", "self_attn.q_proj", "3", "uniform", "4"] == rows[0][:5]
    down = [r for r in rows if r[1] == "mlp.down_proj"]
    assert sorted((r[0], r[2], r[4]) for r in down) == [("0,2", "2", "4"), ("1", "1", "8")]
    assert len(rows) == 8   # 7 kinds, down_proj split by its bit width
    result = runner.invoke(app, ["inspect", str(out), "--all"], env={"COLUMNS": "80"})
    assert sum("uniform" in line for line in result.output.splitlines()) == 21
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    data = json.loads(result.output)
    assert len(data["modules"]) == 21 and data["modules"][0]["name"] == "model.layers.0.self_attn.q_proj"
    assert data["modules"][0]["block"] == 0 and data["modules"][0]["module"] == "self_attn.q_proj"
    assert set(data["dense_mb"]) == {"float32"}
