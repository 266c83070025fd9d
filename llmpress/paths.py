"""Where llmpress keeps derived files (converted models, built corpora)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$LLMPRESS_CACHE``, else ``$XDG_CACHE_HOME/llmpress``, else ``~/.cache/llmpress``."""
    root = os.environ.get("LLMPRESS_CACHE")
    if root:
        return Path(root).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "llmpress"


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` so that readers see the old file or the whole new one, never a part."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
