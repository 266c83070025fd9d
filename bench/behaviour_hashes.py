"""Bit-for-bit behaviour check for refactors: SHA-256 of every tensor that quick runs write.

Quick runs (calibration wiki/train 16x256, seed 0) of eight presets on ``smollm2-135m`` and two
on a tiny random GPT-2 (its transposed ``Conv1D`` weights); each run's output shards are hashed
tensor by tensor (name, dtype, shape and bytes). Record the hashes before a change that must not
alter results, and check them after:

    python bench/behaviour_hashes.py --record bench/behaviour-hashes.json
    python bench/behaviour_hashes.py --check bench/behaviour-hashes.json     # exit 1 on any difference
    python bench/behaviour_hashes.py --check bench/behaviour-hashes.json --only gpt2

Hashes hold for one torch build, thread count and CPU (2 threads here); the file names all three,
and ``--check`` says so when it runs on another CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = [(f"smollm2-135m/{r}", "smollm2-135m", r) for r in (
    "rtn-w4-g64", "gptq-w3-g64", "gptaq-w3-g64", "rht-gptq-w3-g64", "d2quant-w2-g64", "shiftadd-w3", "rocket-30",
    "tt-mixed-30")] + [("tiny-gpt2/gptq-w3-g64", "tiny-gpt2", "gptq-w3-g64"), ("tiny-gpt2/rtn-w4-g64", "tiny-gpt2", "rtn-w4-g64")]


def tiny_gpt2(folder: Path) -> Path:
    """A random 2-block GPT-2 (seed 0) with the SmolLM2 tokenizer."""
    import transformers as tf

    from llmpress.io.models import load_tokenizer, resolve_model

    if not (folder / "config.json").exists():
        torch.manual_seed(0)
        config = tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, vocab_size=49152)
        tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
        load_tokenizer(resolve_model("smollm2-135m")).save_pretrained(folder)
    return folder


def tensor_hashes(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (a safetensors handle)
                t = f.get_tensor(key).contiguous()
                digest = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
                out[key] = digest.hexdigest()[:16]   # 64 bits: ample to tell two runs apart
    return out


def run(name: str, model: str, recipe: str, work: Path) -> dict[str, str]:
    import llmpress

    source = str(tiny_gpt2(work / "tiny-gpt2")) if model == "tiny-gpt2" else model
    out = work / name.replace("/", "--")
    llmpress.compress(source, recipe, out=out, nsamples=16, seqlen=256, progress=False, overwrite=True)
    return tensor_hashes(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", type=Path, help="write the hashes to this JSON file")
    mode.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    ap.add_argument("--only", default="", help="a regular expression: run only the matching runs")
    ap.add_argument("--work", type=Path, default=None, help="keep the runs' folders here (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    runs = [r for r in RUNS if re.search(args.only, r[0])]
    recorded = json.loads(args.check.read_text()) if args.check else {}
    expected = recorded.get("runs", {})
    if args.check and recorded.get("cpu") != cpu_name():
        print(f"recorded on {recorded.get('cpu', 'another CPU')}, checking on {cpu_name()}: GEMM rounding may differ, "
              "so may act-order's permutations and every code after them", flush=True)
    results, failed = {}, []
    with tempfile.TemporaryDirectory(prefix="llmpress-hashes-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, model, recipe in runs:
            start = time.perf_counter()
            results[name] = run(name, model, recipe, work)
            status = "recorded"
            if args.check:
                want = expected.get(name)
                if want is None:
                    status = "not in the file"
                else:
                    diff = sorted(k for k in want.keys() | results[name].keys() if want.get(k) != results[name].get(k))
                    status = "identical" if not diff else f"DIFFERENT in {len(diff)} tensors, e.g. {diff[:3]}"
                    failed += [name] if diff else []
            print(f"{name:32s} {len(results[name]):5d} tensors  {time.perf_counter() - start:6.1f} s  {status}", flush=True)
            if args.record:   # after every run: a long job that is stopped keeps what it finished
                _write(args.record, results)
    return 1 if failed else 0


def cpu_name() -> str:
    """The CPU model and the vector ISA torch dispatches to: BLAS kernels, hence rounding, differ
    between CPUs (the same code and torch gave other GPTQ codes on two machines of one kind)."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown") if Path("/proc/cpuinfo").exists() else "unknown"
    return f"{model} ({torch.backends.cpu.get_cpu_capability()})"


def _write(path: Path, results: dict[str, dict[str, str]]) -> None:
    """Merge ``results`` into the hashes file at ``path`` (runs not run this time are kept)."""
    previous = json.loads(path.read_text())["runs"] if path.exists() else {}
    path.write_text(json.dumps({
        "protocol": "wiki/train 16x256 seed 0; sha256 of dtype, shape and bytes per tensor",
        "torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_name(),
        "runs": {**previous, **results},
    }, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
