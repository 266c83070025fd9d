"""What the benchmark scripts share: where their outputs go, how decoding is timed, and how a
table lands in BENCHMARKS.md. Every script runs as ``python bench/NAME.py``, which puts this
folder on the path."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def decode_rate(model, prompt: torch.Tensor, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` decode tokens/s, and the generated tokens."""
    def generate(n):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0, use_cache=True)
    generate(2)   # warm-up: int4 packing, allocator
    best = 0.0
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        out = generate(new_tokens)
        t2 = time.perf_counter()
        best = max(best, (new_tokens - 1) / ((t2 - t1) - (t1 - t0)))
    return best, out[0, prompt.shape[1]:]


def common_prefix(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading greedy tokens two generations share (one flip changes all that follows)."""
    differ = (a != b).nonzero()
    return int(differ[0, 0]) if len(differ) else len(a)


def decode_prompt(tokenizer):
    """The prompt every decode timing starts from: the first 32 tokens of wiki/test."""
    from llmpress.io.text import load_text, tokenize

    return tokenize(tokenizer, load_text("wiki/test"))[:32].unsqueeze(0)


def folder_name(name: str) -> str:
    """The folder under bench/out that holds a row's compressed model."""
    return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)


def update_benchmarks(section: str, body: str, command: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    block = f"{start}\nCommand: `{command}` ({time.strftime('%Y-%m-%d')})\n\n{body}\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
