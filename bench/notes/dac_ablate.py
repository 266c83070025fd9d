"""Which part of DAC moves D²Quant's perplexity, and by more than the calibration's own spread? (issue #6)

For each calibration seed: compress `d2quant-w<bits>-g64` (full) and the same preset without DAC
(`drop=["dac"]`), then evaluate the full model as saved and with DAC's folded biases taken out
again: the head bias (the final-norm shift), the gate/up biases (the MLP-input shifts), both.
Taking a bias out leaves the weights that were calibrated with it in place, so those rows say what
the bias itself does on held-out text; the no-DAC compression says what DAC does to the whole run.

    python bench/notes/dac_ablate.py 2 --seeds 0 1     # protocol of the benchmark: 128x512, ppl 2048x40
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import llmpress

OUT = Path(__file__).resolve().parents[1] / "out"   # bench/out, beside the suites' folders


@torch.no_grad()
def drop_biases(model, mlp: bool, head: bool) -> None:
    """Zero the biases DAC folded into the model (the stock model has none there)."""
    if mlp:
        for layer in model.model.layers:
            for name in ("gate_proj", "up_proj"):
                linear = getattr(layer.mlp, name)
                if getattr(linear, "bias", None) is not None:
                    linear.bias.zero_()
    if head and getattr(model.lm_head, "bias", None) is not None:
        model.lm_head.bias.zero_()


def evaluate(folder: Path, windows: int, mlp: bool = False, head: bool = False) -> float:
    model, tok = llmpress.load(folder)
    drop_biases(model, mlp, head)
    return llmpress.perplexity(model, tok, "wiki/test", seqlen=2048, windows=windows).ppl


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bits", type=int, choices=(2, 3))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate a complete folder from an earlier run instead of compressing again "
                         "(bench/out/dac-ablate-w<bits>-s<seed>-{full,no_dac}, e.g. links to the d2quant suite's)")
    args = ap.parse_args()
    torch.set_num_threads(1)   # comparable while other jobs share the cores
    OUT.mkdir(parents=True, exist_ok=True)
    preset = f"d2quant-w{args.bits}-g64"
    for seed in args.seeds:
        row = {"bits": args.bits, "seed": seed, "nsamples": args.nsamples, "seqlen": args.seqlen,
               "protocol": f"ppl[wiki/test, 2048x{args.windows}]"}
        for tag, drop in (("full", []), ("no_dac", ["dac"])):
            folder = OUT / f"dac-ablate-w{args.bits}-s{seed}-{tag}"
            if not (args.reuse and (folder / "config.json").exists()):   # config.json is written last
                start = time.perf_counter()
                llmpress.compress("smollm2-135m", preset, out=folder, nsamples=args.nsamples, seqlen=args.seqlen,
                                  seed=seed, progress=False, overwrite=True, drop=drop)
                row[f"{tag}_compress_s"] = round(time.perf_counter() - start)
            row[tag] = evaluate(folder, args.windows)
            print(json.dumps(row), flush=True)
        folder = OUT / f"dac-ablate-w{args.bits}-s{seed}-full"
        row["full_minus_head_bias"] = evaluate(folder, args.windows, head=True)
        row["full_minus_mlp_biases"] = evaluate(folder, args.windows, mlp=True)
        row["full_minus_both"] = evaluate(folder, args.windows, mlp=True, head=True)
        print(json.dumps(row), flush=True)
        with open(OUT / "dac_ablate.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
