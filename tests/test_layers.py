"""The house's floors (formats ← kernels ← layers ← io ← compress/eval ← api ← cli): the
import-linter contracts in pyproject.toml hold, and they would catch an import that runs up; every
layer format rebuilds from the manifest entry it writes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # A fresh interpreter with only ``root`` on the path: the copy below must not see the installed package.
    code = ("import sys; from importlinter.cli import lint_imports; "
            f"sys.exit(lint_imports(config_filename={str(root / 'pyproject.toml')!r}, no_cache=True, no_logo=True))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          env={"PYTHONPATH": str(root), "PATH": ""})


def test_imports_only_go_down():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_import_that_runs_up_is_caught(tmp_path):
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "llmpress", copy / "llmpress", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    packing = copy / "llmpress" / "formats" / "packing.py"
    packing.write_text(packing.read_text() + "\nfrom ..compress import arch  # noqa\n")
    result = _lint_imports(copy)
    assert result.returncode != 0 and "llmpress.formats is not allowed to import llmpress.compress" in result.stdout


def test_every_format_rebuilds_from_its_manifest_entry():
    import json

    import pytest
    import torch

    from llmpress.layers import BCQLinear, DualScaleLinear, FactorLinear, QuantLinear, TTLinear

    layers = [
        QuantLinear(64, 32, bits=3, group_size=16, sym=False, bias=True, has_g_idx=True),
        QuantLinear(64, 32, bits=4, group_size=-1, sym=True, bias=False),
        BCQLinear(64, 32, bits=2, col_block=8, row_groups=8, terms=3, bias=False),
        DualScaleLinear(64, 32, bits=2, group_size=32, bias=True, column_scale=True),
        FactorLinear(64, 32, rank=4, nnz=None, bias=False),
        FactorLinear(64, 32, rank=8, nnz=3, bias=True),
        TTLinear(64, 32, out_modes=[4, 8], in_modes=[8, 8], ranks=[1, 3, 1], bias=False),
    ]
    for layer in layers:
        params = json.loads(json.dumps(layer.format_params()))   # as the manifest stores it
        rebuilt = type(layer).from_format_params(params, torch.float32)
        assert rebuilt.format_params() == params
        assert {k: (v.shape, v.dtype) for k, v in rebuilt.state_dict().items()} == \
            {k: (v.shape, v.dtype) for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match="integers"):
        QuantLinear.from_format_params({**layers[0].format_params(), "bits": "3"}, torch.float32)
