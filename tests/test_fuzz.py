"""Property-based fuzzing of the manifest and the safetensors reader: whatever a tampered folder
holds, loading it either works or raises our one-line ModelLoadError; nothing else escapes."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmpress
from llmpress.errors import LlmpressError

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# values a hostile manifest might put anywhere: wrong types, negatives, huge numbers, nesting
junk = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 40), 2 ** 40) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


@pytest.fixture(scope="module")
def compressed(tiny_model_factory, tmp_path_factory):
    """One compressed tiny model holding every layer format: packed, factor (sparse) and TT."""
    from llmpress.compress.recipe import parse_recipe

    recipe = parse_recipe({"stages": [
        {"method": "gptq", "bits": 3, "group_size": 32, "targets": ["self_attn"]},
        {"method": "tt", "ratio": 0.3, "targets": ["mlp\\.(gate|up)"]},
        {"method": "svd", "ratio": 0.3, "targets": ["down_proj"]},
    ]})
    out = tmp_path_factory.mktemp("fuzz") / "model"
    llmpress.compress(tiny_model_factory("llama"), recipe, out=out, nsamples=4, seqlen=32, progress=False)
    return out


def _load_ok_or_clear_error(folder) -> None:
    try:
        llmpress.load(folder)
    except LlmpressError as e:
        assert "\n" not in str(e)


def _with_manifest(src, dst, edit) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))


@FUZZ
@given(which=st.integers(0, 10 ** 6), field=st.text(max_size=12), value=junk)
def test_fuzzed_module_params(compressed, tmp_path_factory, which, field, value):
    def edit(manifest):
        name = sorted(manifest["modules"])[which % len(manifest["modules"])]
        params = manifest["modules"][name]["params"]
        key = sorted(params)[which % len(params)] if field == "" else field
        params[key] = value

    dst = tmp_path_factory.getbasetemp() / "fuzz-params"
    _with_manifest(compressed, dst, edit)
    _load_ok_or_clear_error(dst)


@FUZZ
@given(key=st.sampled_from(["modules", "transforms", "format_version", "quant_method"]), value=junk)
def test_fuzzed_manifest_fields(compressed, tmp_path_factory, key, value):
    dst = tmp_path_factory.getbasetemp() / "fuzz-fields"
    _with_manifest(compressed, dst, lambda m: m.__setitem__(key, value))
    _load_ok_or_clear_error(dst)


@FUZZ
@given(which=st.integers(0, 10 ** 6), offset=st.integers(0, 10 ** 6), data=st.binary(min_size=1, max_size=16))
def test_fuzzed_safetensors_bytes(compressed, tmp_path_factory, which, offset, data):
    dst = tmp_path_factory.getbasetemp() / "fuzz-bytes"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(compressed, dst)
    shards = sorted(dst.glob("model-*.safetensors"))
    shard = shards[which % len(shards)]
    raw = bytearray(shard.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")
    pos = offset % min(len(raw), header + 64)     # mostly the header: where parsing can go wrong
    raw[pos:pos + len(data)] = data
    shard.write_bytes(bytes(raw))
    try:
        model, _ = llmpress.load(dst)
    except LlmpressError as e:
        assert "\n" not in str(e)
        return
    # a change that still parses may only have changed values: the model still runs or says why
    with torch.no_grad():
        model(torch.randint(0, 1000, (1, 8)))
