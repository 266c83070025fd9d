"""The auto-round peer (issue #31): auto-round's default SignRound recipe at a bit width and group
size, on the very model and calibration windows llmpress's rows use, saved dequantized (its "fake"
format: a dense checkpoint holding the quantized weights) for llmpress's perplexity protocol.

auto-round's dependencies differ from llmpress's, so it runs in an environment of its own
(`make peer-autoround` builds `.venv-autoround`) and reads only files: the dense model as a Hugging
Face folder and the token windows as safetensors, both written by ``bench/quality.py``, which runs
this script for its ``peer:auto-round`` rows and evaluates the folder it writes:

    make peer-autoround
    python bench/quality.py --suite ladder --only auto-round

It prints one JSON line: the compress time (auto-round's quantize and save) and its peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path


def compress(model_dir: Path, windows_file: Path, bits: int, group_size: int, out: Path) -> dict:
    """auto-round's defaults but for the width, the group size and the calibration windows."""
    import auto_round
    import torch
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = load_file(windows_file)["input_ids"]
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer=tokenizer, bits=bits, group_size=group_size,
                        dataset=[w[None] for w in windows], nsamples=len(windows), seqlen=windows.shape[1],
                        device_map="cpu")
    rounder.quantize_and_save(str(out), format="fake")
    result = {"compress_s": time.perf_counter() - start,
              "compress_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peer_version": auto_round.__version__}
    # auto-round writes into a folder of its own naming under `out` (<model>-w<bits>g<group>): the
    # row's folder is to be the model itself
    (written,) = {p.parent for p in out.rglob("config.json")}
    if written != out:
        for item in written.iterdir():
            item.rename(out / item.name)
        written.rmdir()
    (out / "peer.json").write_text(json.dumps(result))   # what a later evaluation of this folder reports
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, required=True, help="the dense model, a Hugging Face folder")
    ap.add_argument("--windows", type=Path, required=True, help="safetensors with `input_ids` [n, seqlen]")
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(json.dumps(compress(args.model_dir, args.windows, args.bits, args.group_size, args.out)))


if __name__ == "__main__":
    main()
