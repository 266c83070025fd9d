"""lm-eval benchmark (issue #10): the shipped offline tasks on dense and compressed SmolLM2-135M.

Rows: dense, GPTQ W4 g64, GPTQ W3 g64 (the presets: act-order, true-sequential; calibration
wiki/train 128x512 seed 0) and RTN W3 g64, each evaluated in its own process on
llmpress_wiki_lastword, llmpress_wiki_cloze and llmpress_wiki_ppl at full size, zero-shot.

    python bench/harness.py               # all rows, updates BENCHMARKS.md
    python bench/harness.py --limit 50    # a quick look (the table says so)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import OUT, update_benchmarks

ROWS = [("dense", None), ("GPTQ W4 g64", "gptq-w4-g64"), ("GPTQ W3 g64", "gptq-w3-g64"), ("RTN W3 g64", "rtn-w3-g64")]
TASKS = ["llmpress_wiki_lastword", "llmpress_wiki_cloze", "llmpress_wiki_ppl"]


def run_one(index: int, limit: float | None) -> dict:
    import llmpress

    name, recipe = ROWS[index]
    model = "smollm2-135m"
    if recipe is not None:
        folder = OUT / f"harness-{recipe}"
        if not (folder / "config.json").exists():
            llmpress.compress(model, recipe, out=folder, overwrite=True, progress=False)
        model = folder
    m, tok = llmpress.load(model)
    start = time.perf_counter()
    results = llmpress.evaluate(m, tok, TASKS, limit=limit, output=OUT / f"harness-{index}.json")
    r = results["results"]
    return {
        "name": name, "recipe": recipe, "seconds": time.perf_counter() - start,
        "lastword_acc": r["llmpress_wiki_lastword"]["acc,none"],
        "lastword_acc_stderr": r["llmpress_wiki_lastword"]["acc_stderr,none"],
        "lastword_ppl": r["llmpress_wiki_lastword"]["perplexity,none"],
        "cloze_acc": r["llmpress_wiki_cloze"]["acc,none"], "cloze_acc_norm": r["llmpress_wiki_cloze"]["acc_norm,none"],
        "word_ppl": r["llmpress_wiki_ppl"]["word_perplexity,none"], "bits_per_byte": r["llmpress_wiki_ppl"]["bits_per_byte,none"],
        "lm_eval": results["lm_eval_version"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--limit", type=float, default=None)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, args.limit)))
        return
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, _recipe) in enumerate(ROWS):
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        cmd = [sys.executable, __file__, "--one", str(i)] + (["--limit", str(args.limit)] if args.limit else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{name} failed")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"    {rows[-1]}", flush=True)
    size = "full size" if args.limit is None else f"--limit {args.limit:g}"
    lines = [
        f"Model `smollm2-135m`; shipped tasks ({size}), zero-shot, lm-eval {rows[0]['lm_eval']}, batch 8, fp32 on "
        "CPU; compressed rows calibrated on wiki/train 128x512 seed 0. Time is the evaluation alone.",
        "",
        "| model | last-word acc | last-word ppl | cloze acc | cloze acc_norm | wiki word ppl | bits/byte | time (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['name']} | {r['lastword_acc']:.4f} ± {r['lastword_acc_stderr']:.4f} | {r['lastword_ppl']:.2f} | "
                     f"{r['cloze_acc']:.4f} | {r['cloze_acc_norm']:.4f} | {r['word_ppl']:.2f} | {r['bits_per_byte']:.4f} | "
                     f"{r['seconds']:.0f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_update:
        update_benchmarks("harness", body, "python bench/harness.py" + (f" --limit {args.limit:g}" if args.limit else ""))


if __name__ == "__main__":
    main()
