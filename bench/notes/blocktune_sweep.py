"""Block tuning's optimiser and step size, on a small budget: `smollm2-135m`, GPTQ W3 g64 then
`block-tune` with each setting, calibration 32x256 (seed 0), ppl[wiki/test, 2048x6]. The evidence
behind the stage's defaults (docs/methods/block-tune.md); one process, settings in turn.

    python bench/notes/blocktune_sweep.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import llmpress
from llmpress.compress.recipe import parse_recipe

SETTINGS = [
    None,                                                     # GPTQ alone
    {"optimizer": "sign", "lr": 0.005},                       # SignRound's optimiser and step
    {"optimizer": "sign", "lr": 0.01},
    {"optimizer": "sign", "lr": 0.005, "scale_range": 0.2},
    {"optimizer": "adam", "lr": 0.002},
    {"optimizer": "scaled", "lr": 0.02},
]


def main() -> None:
    print("| block-tune settings | compress (s) | ppl[wiki/test, 2048x6] | held-out block error (mean of blocks) |")
    print("|---|---|---|---|")
    for settings in SETTINGS:
        stages = [{"method": "gptq", "bits": 3, "group_size": 64}]
        if settings is not None:
            stages.append({"method": "block-tune", "steps": 64, "eval_every": 16, **settings})
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            result = llmpress.compress("smollm2-135m", parse_recipe({"name": "sweep", "stages": stages}),
                                       out=Path(tmp) / "m", nsamples=32, seqlen=256, progress=False, keep_model=True)
            seconds = time.perf_counter() - start
            _, tokenizer = llmpress.load(Path(tmp) / "m")
            ppl = llmpress.perplexity(result.model, tokenizer, "wiki/test", windows=6).ppl
        ratios = [r.metrics["tune_best"] / r.metrics["tune_start"] for r in result.records
                  if r.name.endswith("down_proj") and "tune_start" in r.metrics]
        error = f"{sum(ratios) / len(ratios):.3f}" if ratios else "1"
        print(f"| {settings or 'GPTQ alone'} | {seconds:.0f} | {ppl:.2f} | {error} |", flush=True)


if __name__ == "__main__":
    main()
