"""The auto-round peer (issue #31): auto-round's default SignRound recipe at a bit width and group
size, on the very model and calibration windows llmpress's rows use, saved dequantized (a dense
checkpoint holding the quantized weights) for llmpress's perplexity protocol.

auto-round's dependencies differ from llmpress's, so it runs in an environment of its own
(`make peer-autoround` builds `.venv-autoround`) and reads only files: the dense model as a Hugging
Face folder and the token windows as safetensors, both written by ``bench/quality.py``, which runs
this script for its ``peer:auto-round`` rows and evaluates the folder it writes:

    make peer-autoround
    python bench/quality.py --suite ladder --only auto-round

It prints one JSON line (also kept as ``peer.json`` beside the model): the compress time (auto-round's
quantize), its peak RSS and the bits per weight its packed formats would store.
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
    quantized, _ = rounder.quantize()
    seconds = time.perf_counter() - start
    # quantize() leaves each tuned linear holding its quantized-dequantized weight, rounded to bf16
    # (the model is tuned in bf16 on CPU), with its scales and zeros beside it. What auto-round's
    # packed formats store, (codes − zero)·scale, is rebuilt from those in fp32, and every other
    # tensor is the source's own (fp32). (auto-round 0.16.1's "fake" export cannot serve: it casts
    # to 16 bits, then "restores" every tensor that was fp32 in the source folder, the quantized
    # weights included, which writes the dense model back.)
    dense = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stored = weights = 0   # bits per weight as its packed formats count them: codes, fp16 scales, zeros
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if getattr(module, "bits", 16) < 16 and getattr(module, "scale", None) is not None:
                dense.get_submodule(name).weight.copy_(on_grid(module.weight, module.scale, module.zp, module.bits))
                zeros = module.zp.numel() * module.bits if isinstance(module.zp, torch.Tensor) else 0
                stored += module.weight.numel() * module.bits + module.scale.numel() * 16 + zeros
                weights += module.weight.numel()
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    result = {"compress_s": seconds,
              "compress_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peer_version": auto_round.__version__, "bits_per_weight": round(stored / weights, 4)}
    (out / "peer.json").write_text(json.dumps(result))   # what a later evaluation of this folder reports
    return result


def on_grid(weight, scale, zero, bits: int):
    """``(codes − zero)·scale`` in fp32 for a quantized-dequantized ``weight`` [out, in] with a scale
    per row and group ([out, groups]) and a zero likewise, or one number (auto-round's default
    symmetric grid: ``2^(bits−1)``)."""
    import torch

    out_features, groups = scale.shape
    w = weight.to(torch.float32).reshape(out_features, groups, -1)
    s = scale.to(torch.float32)[..., None]
    z = zero.to(torch.float32)[..., None] if isinstance(zero, torch.Tensor) else float(zero)
    codes = torch.clamp(torch.round(w / s + z), 0, 2 ** bits - 1)
    return ((codes - z) * s).reshape(out_features, -1)


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
