"""GPTQ with the calibration windows drawn as the reference GPTQ code's data loader draws them
(issue #2's act-order gap): Python ``random.seed(seed)``, then per window
``randint(0, N - seqlen - 1)`` on one tokenization of the whole split, instead of llmpress's seeded
torch draw. Compresses, then prints ppl[wiki/test, 2048x40].

    python bench/notes/gptq_reference_draw.py gptq-w3-g64 OUT_DIR [--set act_order=false --set true_sequential=false]
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import llmpress
from llmpress.compress import run
from llmpress.io import text


def reference_windows(tokenizer, spec: str, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    tokens = text.tokenize(tokenizer, text.load_text(spec))
    random.seed(seed)
    starts = [random.randint(0, tokens.numel() - seqlen - 1) for _ in range(n)]
    return torch.stack([tokens[s:s + seqlen] for s in starts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("out")
    ap.add_argument("--set", dest="settings", action="append", default=[])
    args = ap.parse_args()
    run.calibration_windows = reference_windows   # what llmpress.compress draws its windows with
    start = time.perf_counter()
    llmpress.compress("smollm2-135m", args.recipe, out=args.out, overwrite=True, settings=args.settings,
                      progress=False)
    print(f"compress {time.perf_counter() - start:.0f} s", flush=True)
    model, tokenizer = llmpress.load(args.out)
    with torch.no_grad():
        print(args.recipe, args.settings, llmpress.perplexity(model, tokenizer, "wiki/test", seqlen=2048, windows=40))


if __name__ == "__main__":
    main()
