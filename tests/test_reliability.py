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
