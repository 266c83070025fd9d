"""The house's floors (formats ← kernels ← layers ← io ← compress/eval ← api ← cli): the
import-linter contracts in pyproject.toml hold, and they would catch an import that runs up."""

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
