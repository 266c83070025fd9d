"""A quick look at D²Quant's parts (issue #6) before the full ladder (`bench/quality.py --suite d2quant`).

Smaller than the issue's protocol on purpose: calibration wiki/train 32x512, ppl[wiki/test, 2048x8].
Each argument after the bit width is one run, the comma-separated stages it drops ("" = the preset):

    python bench/notes/d2quant_quick.py 2 "dsq,dac" "dac" ""     # +RHT, +RHT+DSQ, full, at W2
"""

from __future__ import annotations

import json
import sys
import time

import torch

import llmpress


def main() -> None:
    torch.set_num_threads(1)   # comparable while other jobs share the cores
    bits = sys.argv[1]
    for drop in [d.split(",") if d else [] for d in sys.argv[2:]]:
        start = time.perf_counter()
        res = llmpress.compress("smollm2-135m", f"d2quant-w{bits}-g64", out=f"bench/out/d2q-{bits}-{'_'.join(drop) or 'full'}",
                                nsamples=32, seqlen=512, progress=False, overwrite=True, drop=drop)
        model, tok = llmpress.load(res.out)
        ppl = llmpress.perplexity(model, tok, "wiki/test", windows=8)
        print(json.dumps({"bits": bits, "drop": drop, "protocol": ppl.protocol, "ppl": ppl.ppl,
                          "seconds": round(time.perf_counter() - start)}), flush=True)


if __name__ == "__main__":
    main()
