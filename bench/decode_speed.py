"""CPU decode speed of a suite's saved models, measured again one after the other in one process.

`bench/quality.py` times decoding right after each row's evaluation, often while other jobs share
the cores, so its tok/s column compares badly across rows. This script loads the dense model and
every row's saved folder (bench/out/<row>), then times greedy decoding on one thread with the same
prompt in rounds, each round every model once (so a drift of the machine's speed reaches every row
alike); it prints a table of the best and the median round with the ratio to a baseline row (dense
by default), and writes the new numbers into the suite's log so that `python bench/quality.py
--suite S --from-log` shows them. Run it on an otherwise idle machine.

    python bench/decode_speed.py --suite tt
    python bench/decode_speed.py --suite rotation --only "W2 g64" --baseline "GPTQ W2 g64"
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

import torch
from common import OUT, decode_prompt, decode_rate, folder_name

import llmpress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5, help="rounds; each times every model once")
    ap.add_argument("--only", default=None, help="time the rows whose name this regex searches (dense always)")
    ap.add_argument("--baseline", default="dense", help="the row the ratio column divides by")
    args = ap.parse_args()
    log = OUT / f"{args.suite}.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    latest = {r["name"]: r for r in rows}   # the latest row of each name, as --from-log reads them
    torch.set_num_threads(1)
    models: dict[str, torch.nn.Module] = {}
    prompt = None
    for name, row in latest.items():
        if args.only and row.get("recipe") is not None and not re.search(args.only, name) and name != args.baseline:
            continue
        folder = "smollm2-135m" if row.get("recipe") is None else OUT / folder_name(name)
        if row.get("recipe") is not None and not (folder / "config.json").exists():
            print(f"{name}: no saved folder, skipped", flush=True)
            continue
        models[name], tok = llmpress.load(folder)
        if prompt is None:
            prompt = decode_prompt(tok)
    runs: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.repeats):
        for name, model in models.items():
            runs[name].append(decode_rate(model, prompt, args.tokens, 1)[0])
        print(f"[{time.strftime('%H:%M:%S')}] round {r + 1}: " + ", ".join(f"{n} {v[-1]:.1f}" for n, v in runs.items()),
              flush=True)
    rates = {name: max(v) for name, v in runs.items()}
    medians = {name: statistics.median(v) for name, v in runs.items()}
    base, base_median = rates.get(args.baseline), medians.get(args.baseline)
    print(f"\nCPU greedy decode, 1 thread, {args.tokens} new tokens after a 32-token wiki/test prompt, "
          f"{args.repeats} interleaved rounds, all rows in one process\n")
    print(f"| configuration | tok/s (best) | vs {args.baseline} | tok/s (median) | vs {args.baseline} |")
    print("|---|---|---|---|---|")
    for name, rate in rates.items():
        ratio = f"{rate / base:.2f}" if base else "–"
        ratio_median = f"{medians[name] / base_median:.2f}" if base_median else "–"
        print(f"| {name} | {rate:.1f} | {ratio} | {medians[name]:.1f} | {ratio_median} |")
    for row in rows:
        if row["name"] in rates and row is latest[row["name"]]:
            row["decode_tok_s"] = rates[row["name"]]
            row["decode_same_process"] = True
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
