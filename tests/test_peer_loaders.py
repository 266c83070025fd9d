"""Exports read by the peers' own loaders, in the peers' own environment.

GPTQModel pins numpy and transformers versions of its own, so it lives in a second virtual
environment (``make test`` builds ``.venv-peers``; ``LLMPRESS_PEER_PYTHON`` names another). The
check runs there as a subprocess: it loads the export with GPTQModel and compares its dequantized
weights and logits with what llmpress computed, handed over as safetensors.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import llmpress
from llmpress.compress.recipe import parse_recipe
from llmpress.io.export import export
from llmpress.layers import QuantLinear

PEER_PYTHON = os.environ.get("LLMPRESS_PEER_PYTHON") or str(Path(__file__).parents[1] / ".venv-peers" / "bin" / "python")

GPTQMODEL_CHECK = """
import json, sys, torch
from safetensors.torch import load_file
from gptqmodel import BACKEND, GPTQModel

folder, reference = sys.argv[1], load_file(sys.argv[2])
ids = reference.pop("input_ids")
want_logits = reference.pop("logits")
report = {}
# The pure-torch kernel in fp16, where GPTQModel's own dequantization can be read per module,
# then the kernel a CPU user gets by default (bf16).
for name, kwargs in (("torch fp16", dict(dtype=torch.float16, backend=BACKEND.TORCH)), ("auto bf16", dict(dtype=torch.bfloat16))):
    model = GPTQModel.load(folder, device="cpu", **kwargs)
    worst = 0.0
    if name == "torch fp16":
        for module_name, module in model.model.named_modules():
            if module_name in reference:
                got, want = module.dequantize_weight().T.float(), reference[module_name]
                worst = max(worst, float((got - want).abs().max() / want.abs().max()))
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    report[name] = {"weights": worst, "logits": float((logits - want_logits).abs().max() / want_logits.abs().max()),
                    "kernels": sorted({type(m).__name__ for m in model.model.modules() if hasattr(m, "qweight")})}
    del model
print("REPORT " + json.dumps(report))
"""


def _peer_has(module: str) -> bool:
    if not Path(PEER_PYTHON).exists():
        return False
    return subprocess.run([PEER_PYTHON, "-c", f"import {module}"], capture_output=True).returncode == 0


@pytest.mark.parametrize("sym", [False, True])
def test_gptq_export_loads_in_gptqmodel(sym, tiny_model_factory, tmp_path):
    if not _peer_has("gptqmodel"):
        pytest.skip(f"GPTQModel is not installed beside {PEER_PYTHON} (make test installs it in .venv-peers)")
    recipe = parse_recipe({"stages": [{"method": "gptq", "bits": 4, "group_size": 32, "sym": sym, "act_order": True}]})
    src = tmp_path / "src"
    llmpress.compress(tiny_model_factory("llama"), recipe, out=src, nsamples=8, seqlen=64, progress=False)
    export(src, tmp_path / "gptq", "gptq")
    model, _ = llmpress.load(src)
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    reference = {n: m.dequantize(torch.float32) for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    save_file({**reference, "input_ids": ids, "logits": logits.contiguous()}, str(tmp_path / "reference.safetensors"))
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": ""}
    proc = subprocess.run([PEER_PYTHON, "-c", GPTQMODEL_CHECK, str(tmp_path / "gptq"), str(tmp_path / "reference.safetensors")],
                          capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    print(report)
    assert report["torch fp16"]["weights"] <= 1e-3        # fp16 rounding of the same dequantized weights
    assert report["torch fp16"]["logits"] <= 2e-2
    assert report["auto bf16"]["logits"] <= 2e-2          # bf16 activations
