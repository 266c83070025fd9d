"""A real compression run killed with SIGKILL at a random block, then resumed, equals an
uninterrupted run tensor for tensor."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import llmpress
from llmpress.errors import ModelLoadError
from llmpress.io.checkpoint import STATE_FILE

RUN = """
import sys, llmpress
llmpress.compress(sys.argv[1], "gptq-w3-g64", out=sys.argv[2], nsamples=4, seqlen=32, progress=False,
                  resume=len(sys.argv) > 3)
"""


@pytest.fixture(scope="module")
def deep_tiny_model(tmp_path_factory, smol_tokenizer):
    """An 8-block random Llama: enough blocks for the kill to land in the middle of the run."""
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=8, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=49152, max_position_embeddings=256)
    folder = tmp_path_factory.mktemp("deep-tiny")
    tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


def _finished(folder) -> int:
    try:
        return len(json.loads((folder / STATE_FILE).read_text()).get("finished", {}))
    except (OSError, ValueError):
        return 0


def _shards(folder):
    tensors = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def test_sigkill_at_a_random_block_then_resume_is_identical(deep_tiny_model, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole, part = tmp_path / "whole", tmp_path / "part"
    subprocess.run([sys.executable, "-c", RUN, str(deep_tiny_model), str(whole)], check=True, env=env)

    kill_after = random.Random(os.getpid()).randint(1, 6)   # blocks finished before the kill
    proc = subprocess.Popen([sys.executable, "-c", RUN, str(deep_tiny_model), str(part)], env=env)
    try:
        deadline = time.monotonic() + 600
        while _finished(part) < kill_after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    if proc.returncode == 0:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    done = _finished(part)
    assert 1 <= done < 8
    assert not (part / "config.json").exists()          # never presented as complete
    with pytest.raises(ModelLoadError, match="incomplete"):
        llmpress.load(part)

    subprocess.run([sys.executable, "-c", RUN, str(deep_tiny_model), str(part), "resume"], check=True, env=env)
    a, b = _shards(whole), _shards(part)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not list(part.glob(".*tmp*"))                # no temporary file left behind


# -- the bad-input table: every case ends in one line, exit code 2, and no folder that looks complete

def _copy_model(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _case_missing_shard(model, tmp):
    folder = _copy_model(model, tmp / "m")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return ["compress", folder, "--recipe", "rtn-w4", "--out", tmp / "o"]


def _case_truncated_shard(model, tmp):
    folder = _copy_model(model, tmp / "m")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return ["compress", folder, "--recipe", "rtn-w4", "--out", tmp / "o"]


def _case_mismatched_config(model, tmp):
    folder = _copy_model(model, tmp / "m")
    config = json.loads((folder / "config.json").read_text())
    config["intermediate_size"] = 96
    (folder / "config.json").write_text(json.dumps(config))
    return ["compress", folder, "--recipe", "rtn-w4", "--out", tmp / "o"]


def _recipe_case(text):
    def case(model, tmp):
        recipe = tmp / "r.yaml"
        recipe.write_text(text)
        return ["compress", model, "--recipe", recipe, "--out", tmp / "o"]
    return case


def _set_case(*settings, recipe="gptq-w4-g64"):
    def case(model, tmp):
        return ["compress", model, "--recipe", recipe, "--out", tmp / "o", *[a for s in settings for a in ("--set", s)]]
    return case


def _calib_case(text):
    def case(model, tmp):
        data = tmp / "calib.txt"
        data.write_text(text)
        return ["compress", model, "--recipe", "gptq-w4-g64", "--calib", data, "--out", tmp / "o",
                "--nsamples", "4", "--seqlen", "32"]
    return case


def _case_output_under_a_file(model, tmp):
    (tmp / "file").write_text("x")
    return ["compress", model, "--recipe", "rtn-w4", "--out", tmp / "file" / "o"]


def _case_incomplete_folder(command):
    def case(model, tmp):
        out = tmp / "o"
        out.mkdir()
        (out / STATE_FILE).write_text(json.dumps({"fingerprint": "x", "finished": {}}))
        return [command, out] if command == "inspect" else [command, out, "--windows", "1"]
    return case


BAD_INPUTS = {
    "missing shard": (_case_missing_shard, r"missing|no such|not found|cannot"),
    "truncated shard": (_case_truncated_shard, r"corrupt|truncat|cannot read|invalid"),
    "mismatched config": (_case_mismatched_config, r"shape|mismatch|size"),
    "recipe typo": (_recipe_case("stages:\n  - method: gptq\n    bits: 4\n    grup_size: 64\n"), r"did you mean 'group_size'"),
    "unknown method": (_recipe_case("stages:\n  - method: gpqt\n    bits: 4\n"), r"unknown method 'gpqt'.*did you mean 'gptq'"),
    "wrong type": (_recipe_case("stages:\n  - method: gptq\n    bits: four\n"), r"bits"),
    "bits outside 2-8": (_recipe_case("stages:\n  - method: rtn\n    bits: 5\n"), r"bits must be one of"),
    "group size zero": (_set_case("group_size=0"), r"group_size must be"),
    "damp out of range": (_set_case("damp=3"), r"damp"),
    "not yaml": (_recipe_case("stages: [\n"), r"not valid YAML"),
    "no stages": (_recipe_case("name: x\n"), r"stages"),
    "rotation not first": (_recipe_case("stages:\n  - method: rtn\n    bits: 4\n  - method: rht\n"), r"must come first"),
    "svd ratio above 1": (_set_case("ratio=1.5", recipe="svd-30"), r"ratio"),
    "rocket target 0": (_set_case("target=0", recipe="rocket-30"), r"target"),
    "tt order 7": (_set_case("order=7", recipe="tt-30"), r"order"),
    "unknown --set key": (_set_case("bitz=3"), r"no stage of this recipe has that key.*did you mean 'bits'"),
    "empty calibration file": (_calib_case(""), r"has 0 tokens"),
    "too-short calibration": (_calib_case("just a few words here"), r"too short|not enough|tokens"),
    "output under a file": (_case_output_under_a_file, r"cannot write|not a folder|exists"),
    "incomplete folder to eval": (_case_incomplete_folder("eval"), r"incomplete"),
    "incomplete folder to inspect": (_case_incomplete_folder("inspect"), r"incomplete"),
    "unknown recipe name": (lambda m, t: ["compress", m, "--recipe", "gptq-w9", "--out", t / "o"], r"no recipe named"),
    "unknown eval dataset": (lambda m, t: ["eval", m, "--dataset", "nosuch/split", "--windows", "1"], r"nosuch"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_table(case, tiny_model_factory, tmp_path):
    from typer.testing import CliRunner

    from llmpress.cli import app

    make, pattern = BAD_INPUTS[case]
    args = [str(a) for a in make(tiny_model_factory("llama"), tmp_path)]
    result = CliRunner().invoke(app, args)
    stderr = (result.stderr or "").strip()
    assert result.exit_code == 2, (case, result.exit_code, result.output, result.exception)
    assert stderr.count("\n") == 0 and stderr.startswith("error:"), stderr
    import re

    assert re.search(pattern, stderr, re.IGNORECASE), stderr
    assert not (tmp_path / "o" / "config.json").exists()


# -- distributed calibration: torchrun with gloo on CPU equals one process ---------------------------

DIST_RUN = """
import sys, llmpress
llmpress.compress(sys.argv[1], sys.argv[2], out=sys.argv[3], nsamples=12, seqlen=32, batch_size=4, progress=False)
"""


@pytest.mark.parametrize("recipe", ["gptaq-w3-g64", "rocket-30"])
def test_torchrun_two_ranks_equal_one_process(recipe, tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    script = tmp_path / "run.py"
    script.write_text(DIST_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), str(folder), recipe, str(tmp_path / "one")], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    str(script), str(folder), recipe, str(tmp_path / "two")], check=True, env=env,
                   capture_output=True)
    one, two = _shards(tmp_path / "one"), _shards(tmp_path / "two")
    assert one.keys() == two.keys()
    for key in one:
        if one[key].is_floating_point():
            continue
        # integer codes and indices: identical up to a rare rounding tie (sums in another order)
        assert (one[key] != two[key]).float().mean() <= 0.01, key
    a, _ = llmpress.load(tmp_path / "one")
    b, _ = llmpress.load(tmp_path / "two")
    from llmpress.layers import LAYER_FORMATS

    for (name, ma), mb in zip(a.named_modules(), b.modules()):
        if isinstance(ma, tuple(LAYER_FORMATS.values())):
            torch.testing.assert_close(ma.dequantize(), mb.dequantize(), rtol=1e-3, atol=1e-3, msg=name)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["quantization_config"]["fingerprint"] == \
        json.loads((tmp_path / "one" / "config.json").read_text())["quantization_config"]["fingerprint"]


def test_solve_owners_balance_the_cost_and_agree_on_every_rank():
    from llmpress.compress.distributed import assign_owners

    # SmolLM2's q/k/v (576, 192, 192 rows of 576 columns): q on one rank, k and v on the other
    qkv = [576.0**2 * (576 + 576), 576.0**2 * (576 + 192), 576.0**2 * (576 + 192)]
    assert assign_owners(qkv, ranks=2) == [0, 1, 1]
    assert assign_owners([5, 1, 1, 3], ranks=2) == [0, 1, 1, 1]        # loads 5 and 5
    assert assign_owners([2, 2, 2], ranks=1) == [0, 0, 0]
    assert assign_owners([1.0], ranks=4) == [0]
    costs = torch.rand(12, generator=torch.Generator().manual_seed(0)).tolist()
    owners = assign_owners(costs, ranks=3)
    loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(3)]
    assert max(loads) <= 4 / 3 * max(sum(costs) / 3, max(costs)) + 1e-9   # LPT's bound


def test_activations_beyond_the_memory_budget_go_to_disk_and_change_nothing(tiny_model_factory, tmp_path):
    from llmpress.api import parse_size

    folder = tiny_model_factory("llama")
    ram = llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "ram", nsamples=8, seqlen=32, progress=False)
    disk = llmpress.compress(folder, "gptaq-w3-g64", out=tmp_path / "disk", nsamples=8, seqlen=32, progress=False,
                             max_memory="1KB")
    assert "(RAM, RAM)" in ram.summary["memory plan"] and "(disk, disk)" in disk.summary["memory plan"]
    a, b = _shards(tmp_path / "ram"), _shards(tmp_path / "disk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert parse_size("1.5GiB") == 3 << 29 and parse_size("512MB") == 512 << 20 and parse_size(7) == 7
    with pytest.raises(llmpress.errors.RecipeError, match="max-memory"):
        parse_size("lots")


def test_large_tensors_are_read_by_row_slabs_exactly(tmp_path, monkeypatch):
    """Past the slab size a tensor is read a slab of rows at a time (a ragged last slab, fp16 to
    fp32, a transposed Conv1D weight, natively): the same values as reading it whole."""
    from safetensors.torch import save_file

    from llmpress.io import models

    g = torch.Generator().manual_seed(0)
    tensors = {"big": torch.randn(37, 16, generator=g).half(), "conv": torch.randn(16, 23, generator=g),
               "ids": torch.arange(50, dtype=torch.int64), "small": torch.randn(3, generator=g)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(models, "_CHUNK_BYTES", 5 * 16 * 2)   # 5 fp16 rows of 16
    store = models.LazyWeights(tmp_path, transposed={"conv"})
    got = store.read(list(tensors))
    assert got["big"].dtype == torch.float32 and torch.equal(got["big"], tensors["big"].float())
    assert torch.equal(got["conv"], tensors["conv"].T) and torch.equal(got["ids"], tensors["ids"])
    assert torch.equal(got["small"], tensors["small"])
    native = store.read(["big"], native=True)["big"]
    assert native.dtype == torch.float16 and torch.equal(native, tensors["big"])
