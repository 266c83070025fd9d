"""CPU decode speed of a suite's saved models, measured again one after the other in one process.

`bench/quality.py` times decoding right after each row's evaluation, often while other jobs share
the cores, so its tok/s column compares badly across rows. This script loads the dense model and
every row's saved folder (bench/out/<row>) in turn, on one thread, times greedy decoding with the
same prompt (best of 3 runs of 64 tokens), prints a table with the ratio to dense, and writes the
new numbers into the suite's log so that `python bench/quality.py --suite S --from-log` shows them.
Run it on an otherwise idle machine.

    python bench/decode_speed.py --suite tt
    python bench/decode_speed.py --suite rotation --only "W4 per-row"   # rows whose name matches (and dense)
"""

from __future__ import annotations

import argparse
import json
import re
import time

import torch
from common import OUT, decode_prompt, decode_rate, folder_name

import llmpress


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default=None, help="time the rows whose name this regex searches (dense always)")
    args = ap.parse_args()
    log = OUT / f"{args.suite}.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    latest = {r["name"]: r for r in rows}   # the latest row of each name, as --from-log reads them
    torch.set_num_threads(1)
    rates: dict[str, float] = {}
    prompt = None
    for name, row in latest.items():
        if args.only and row.get("recipe") is not None and not re.search(args.only, name):
            continue
        folder = "smollm2-135m" if row.get("recipe") is None else OUT / folder_name(name)
        if row.get("recipe") is not None and not (folder / "config.json").exists():
            print(f"{name}: no saved folder, skipped", flush=True)
            continue
        model, tok = llmpress.load(folder)
        if prompt is None:
            prompt = decode_prompt(tok)
        rates[name] = decode_rate(model, prompt, args.tokens, args.repeats)[0]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {rates[name]:.1f} tok/s", flush=True)
        del model
    base = rates.get("dense")
    print(f"\nCPU greedy decode, 1 thread, {args.tokens} new tokens after a 32-token wiki/test prompt, best of "
          f"{args.repeats}, all rows in one process\n")
    print("| configuration | tok/s | vs dense |")
    print("|---|---|---|")
    for name, rate in rates.items():
        print(f"| {name} | {rate:.1f} | {rate / base:.2f} |" if base else f"| {name} | {rate:.1f} | – |")
    for row in rows:
        if row["name"] in rates and row is latest[row["name"]]:
            row["decode_tok_s"] = rates[row["name"]]
            row["decode_same_process"] = True
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
