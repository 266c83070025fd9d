"""Scale benchmark (issue #11): an 8B-shaped checkpoint compressed on this machine.

Writes a Llama-3-8B-shaped model with random fp16 weights (hidden 4096, MLP 14336, 32 blocks,
GQA 32/8 heads, vocabulary 128256; one safetensors shard per block, written tensor by tensor so
the writer never holds more than a block), then compresses it with RTN W4 and GPTQ W4 (few
calibration windows; ``--recipes`` for others), each in a process of its own through the CLI, and
reports each process's peak RSS, time per block and disk used. The SmolLM2 tokenizer stands in (its ids are inside the vocabulary).

    python bench/big_model.py                       # the 8B shape, both recipes, updates BENCHMARKS.md
    python bench/big_model.py --layers 2 --no-update   # a quick look at two blocks
    python bench/big_model.py --layers 4 --recipes gptq-w4-g64,rht-gptq-w4-g64   # peak and time per block
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5)


def write_checkpoint(folder: Path, layers: int, seed: int = 0) -> int:
    """The random fp16 checkpoint (weights ~ N(0, 0.02²), norms 1); returns its bytes."""
    from transformers import AutoTokenizer, LlamaConfig

    from llmpress.io.models import resolve_model

    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(num_hidden_layers=layers, tie_word_embeddings=False, torch_dtype="float16", **LLAMA3_8B)
    g = torch.Generator().manual_seed(seed)
    h, m = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.float16)

    weight_map, total = {}, 0
    shards = [("model.embed_tokens.weight", (config.vocab_size, h)), ("lm_head.weight", (config.vocab_size, h))]
    for name, shape in shards:   # the two big matrices, one file each
        file = f"{name.split('.')[-2]}.safetensors"
        save_file({name: rand(*shape)}, str(folder / file))
        weight_map[name] = file
    for i in range(layers):
        p = f"model.layers.{i}."
        block = {
            p + "self_attn.q_proj.weight": rand(h, h), p + "self_attn.k_proj.weight": rand(kv, h),
            p + "self_attn.v_proj.weight": rand(kv, h), p + "self_attn.o_proj.weight": rand(h, h),
            p + "mlp.gate_proj.weight": rand(m, h), p + "mlp.up_proj.weight": rand(m, h),
            p + "mlp.down_proj.weight": rand(h, m),
            p + "input_layernorm.weight": torch.ones(h, dtype=torch.float16),
            p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.float16),
        }
        file = f"block-{i:03d}.safetensors"
        save_file(block, str(folder / file))
        weight_map.update(dict.fromkeys(block, file))
        del block
    save_file({"model.norm.weight": torch.ones(h, dtype=torch.float16)}, str(folder / "norm.safetensors"))
    weight_map["model.norm.weight"] = "norm.safetensors"
    for file in set(weight_map.values()):
        total += (folder / file).stat().st_size
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}))
    config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve_model("smollm2-135m")).save_pretrained(folder)
    return total


def compress(source: Path, recipe: str, out: Path, nsamples: int, seqlen: int, max_memory: str | None) -> dict:
    """Run the CLI in a child process; its peak RSS is the children's maximum."""
    cmd = [sys.executable, "-m", "llmpress", "compress", str(source), "--recipe", recipe, "--out", str(out),
           "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--overwrite", "--no-progress"]
    if max_memory:
        cmd += ["--max-memory", max_memory]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)   # this child's own peak, not the running maximum
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{recipe} failed:\n{err.read().decode(errors='replace')[-3000:]}")
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"recipe": recipe, "seconds": seconds, "peak_rss_mb": usage.ru_maxrss / 1024, "disk_bytes": disk}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=ROOT / "bench" / "out" / "big")
    ap.add_argument("--recipes", default="rtn-w4-g64,gptq-w4-g64")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-memory", default=None, help="passed to llmpress compress")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    ap.add_argument("--no-update", action="store_true")
    args = ap.parse_args()

    source = args.dir / "llama3-8b-shaped"
    start = time.perf_counter()
    size = write_checkpoint(source, args.layers)
    write_s = time.perf_counter() - start
    rows = []
    for recipe in args.recipes.split(","):
        row = compress(source, recipe, args.dir / recipe, args.nsamples, args.seqlen, args.max_memory)
        rows.append(row)
        print(json.dumps(row), flush=True)
    lines = [
        f"Llama-3-8B-shaped random checkpoint ({args.layers} blocks, fp16, {size / 1e9:.1f} GB in "
        f"{args.layers + 3} shards, written in {write_s:.0f} s); calibration wiki/train {args.nsamples}x{args.seqlen}; "
        "each recipe one `llmpress compress` process on this 2-core, 24 GB CPU machine; peak RSS is that "
        "process's own.",
        "",
        "| recipe | time (s) | time per block (s) | peak RSS (MB) | output on disk (GB) | output / source |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['recipe']}` | {r['seconds']:.0f} | {r['seconds'] / args.layers:.1f} | "
                     f"{r['peak_rss_mb']:.0f} | {r['disk_bytes'] / 1e9:.2f} | {r['disk_bytes'] / size:.3f} |")
    body = "\n".join(lines)
    print(body)
    if not args.no_update:
        from common import update_benchmarks

        update_benchmarks("big-model", body, "python bench/big_model.py" + (
            f" --layers {args.layers}" if args.layers != 32 else "") + (
            f" --recipes {args.recipes}" if args.recipes != ap.get_default("recipes") else ""))
    if not args.keep:
        shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
