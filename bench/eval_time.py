"""Evaluation wall time of compressed models against the dense one, in one process.

Rows: dense `smollm2-135m` and the decode benchmark's GPTQ W4 g64 and W3 g64 folders (compressed
with 16x256 windows when missing: calibration does not change the time). Columns: the wall time
of `ppl[wiki/test, 2048x8]` (what `llmpress eval DIR --dataset wiki/test --windows 8` computes)
and of lm-eval's `llmpress_wiki_lastword --limit 200` (`llmpress eval DIR --tasks ... --limit 200`,
batch 8), each with its ratio to dense: the best of two rounds over all three models, the second in
reverse order (a single pass in turn moved a row by 10% with the order it ran in). Run it on an
otherwise idle machine.

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


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2,
                    help="rounds over the rows, every other one in reverse order; each time is the best round's")
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()
    lines = [f"`smollm2-135m`; {torch.get_num_threads()} threads; one process, all models loaded, {args.rounds} "
             "rounds over the rows (every other round in reverse order), each time the best round's; "
             "ppl[wiki/test, 2048x8] and lm-eval `llmpress_wiki_lastword` with `--limit 200` (batch 8).", "",
             "| model | ppl (s) | vs dense | ppl | lastword (s) | vs dense | lastword acc |", "|---|---|---|---|---|---|---|"]
    models = {name: llmpress.load("smollm2-135m" if recipe is None else quick_model(recipe)) for name, recipe in ROWS}
    best: dict[str, list[float]] = {name: [float("inf"), float("inf")] for name in models}
    found: dict[str, tuple[float, float]] = {}
    for r in range(args.rounds):
        for name in (list(models) if r % 2 == 0 else list(reversed(models))):
            model, tokenizer = models[name]
            t_ppl, ppl = timed(llmpress.perplexity, model, tokenizer, "wiki/test", windows=8)
            t_task, results = timed(llmpress.evaluate, model, tokenizer, ["llmpress_wiki_lastword"], limit=200)
            found[name] = (ppl.ppl, results["results"]["llmpress_wiki_lastword"]["acc,none"])
            best[name] = [min(best[name][0], t_ppl), min(best[name][1], t_task)]
            print(f"round {r}: {name} ppl {t_ppl:.1f} s, lastword {t_task:.1f} s", flush=True)
    base = best[ROWS[0][0]]
    for name, _ in ROWS:
        (t_ppl, t_task), (ppl, acc) = best[name], found[name]
        lines.append(f"| {name} | {t_ppl:.1f} | {t_ppl / base[0]:.2f}x | {ppl:.2f} | {t_task:.1f} | "
                     f"{t_task / base[1]:.2f}x | {acc:.3f} |")
    print("\n".join(lines[-len(ROWS):]), flush=True)
    publish(lines, "eval-time", "python bench/eval_time.py", not args.no_update)


if __name__ == "__main__":
    main()
