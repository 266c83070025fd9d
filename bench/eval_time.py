"""Evaluation wall time of compressed models against the dense one, in one process.

Rows: dense `smollm2-135m` and the decode benchmark's GPTQ W4 g64 and W3 g64 folders (compressed
with 16x256 windows when missing: calibration does not change the time). Columns: the wall time
of `ppl[wiki/test, 2048x8]` (what `llmpress eval DIR --dataset wiki/test --windows 8` computes)
and of lm-eval's `llmpress_wiki_lastword --limit 200` (`llmpress eval DIR --tasks ... --limit 200`,
batch 8), each with its ratio to dense. Run it on an otherwise idle machine.

    python bench/eval_time.py              # updates BENCHMARKS.md
    python bench/eval_time.py --no-update
"""

from __future__ import annotations

import argparse
import time

import torch
from common import publish, quick_model

import llmpress

ROWS = (("dense fp32", None), ("GPTQ W4 g64", "gptq-w4-g64"), ("GPTQ W3 g64", "gptq-w3-g64"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()
    lines = [f"`smollm2-135m`; {torch.get_num_threads()} threads; one process, rows in turn; ppl[wiki/test, 2048x8] "
             "and lm-eval `llmpress_wiki_lastword` with `--limit 200` (batch 8).", "",
             "| model | ppl (s) | vs dense | ppl | lastword (s) | vs dense | lastword acc |", "|---|---|---|---|---|---|---|"]
    base = None
    for name, recipe in ROWS:
        model, tokenizer = llmpress.load("smollm2-135m" if recipe is None else quick_model(recipe))
        start = time.perf_counter()
        ppl = llmpress.perplexity(model, tokenizer, "wiki/test", windows=8).ppl
        t_ppl = time.perf_counter() - start
        start = time.perf_counter()
        results = llmpress.evaluate(model, tokenizer, ["llmpress_wiki_lastword"], limit=200)
        t_task = time.perf_counter() - start
        acc = results["results"]["llmpress_wiki_lastword"]["acc,none"]
        base = base or (t_ppl, t_task)
        lines.append(f"| {name} | {t_ppl:.1f} | {t_ppl / base[0]:.2f}x | {ppl:.2f} | {t_task:.1f} | "
                     f"{t_task / base[1]:.2f}x | {acc:.3f} |")
        print(lines[-1], flush=True)
        del model
    publish(lines, "eval-time", "python bench/eval_time.py", not args.no_update)


if __name__ == "__main__":
    main()
