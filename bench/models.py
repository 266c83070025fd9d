"""Model maps: what tracing costs on full-size configs, and the traced map against the declared one.

Part 1, the trace (`llmpress inspect-model`): the skeletons of full-size configs, built on the meta
device (no weight exists), traced one block per structure; time, block structures, groups and linears per block. Configs: Llama-3-8B, Llama-3-8B with its map removed (the
traced path), Qwen1.5-MoE-A2.7B (60 experts and a shared one), and the DeepSeek-V3 family (MLA, a dense
first block, then routed and shared experts) at DeepSeek-V2-Lite's size.

Part 2, the real model: `smollm2-135m` compressed with `gptq-w4-g64` (calibration 128x512) once with
Llama's declared map and once with the traced map (the family's entry removed for the run): compress
time, whether the two compressed models are identical, ppl[wiki/test, 2048x40]. The traced map has
no residual shortcut and no attention cache, so it runs more of each block again.

    python bench/models.py              # updates BENCHMARKS.md
    python bench/models.py --no-update --skip-real
"""

from __future__ import annotations

import argparse
import shutil
import time

import torch
from common import OUT, publish

import llmpress
from llmpress.compress import arch as arch_module
from llmpress.compress.arch import arch_for
from llmpress.compress.discover import describe_model
from llmpress.io.models import empty_model, linearize


def _configs():
    import transformers as tf

    llama8b = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
    return [
        ("Llama-3-8B (declared)", tf.LlamaConfig(**llama8b), False),
        ("Llama-3-8B (traced)", tf.LlamaConfig(**llama8b), True),
        ("Qwen1.5-MoE-A2.7B", tf.Qwen2MoeConfig(
            hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
            num_experts=60, num_experts_per_tok=4, num_hidden_layers=24, num_attention_heads=16,
            num_key_value_heads=16, vocab_size=151936), False),
        # DeepSeek-V3's own size cannot be built here: accelerate's empty-weights context allocates
        # each fused expert tensor (30 GB) before moving it to the meta device. Its family at the
        # size of DeepSeek-V2-Lite instead (64 routed experts, 2 shared, the first block dense).
        ("DeepSeek-V3 family, V2-Lite size", tf.DeepseekV3Config(
            hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408, n_routed_experts=64,
            n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, num_hidden_layers=27,
            num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512, q_lora_rank=None,
            qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_group=1, topk_group=1,
            vocab_size=102400), False),
    ]


def trace_rows() -> list[str]:
    lines = ["| config | map | block structures | groups | linears per block (max) | trace (s) |",
             "|---|---|---|---|---|---|"]
    for name, config, traced in _configs():
        model = empty_model(config)
        linearize(model)
        saved = arch_module.ARCHITECTURES.pop(config.model_type) if traced else None
        start = time.perf_counter()
        try:
            d = describe_model(model, arch_for(model))
        finally:
            if saved is not None:
                arch_module.ARCHITECTURES[config.model_type] = saved
        seconds = time.perf_counter() - start
        blocks = model.get_submodule(arch_for(model).blocks)
        per_block = max(len(arch_for(model).linears_in(b)) for b in blocks)
        structures = len({r.blocks for r in d.rows})
        groups = max(r.group for r in d.rows)
        lines.append(f"| {name} | {d.map} | {structures} | {groups} | {per_block} | {seconds:.1f} |")
        print(lines[-1], flush=True)
        del model
    return lines


def real_rows(windows: int) -> list[str]:
    lines = [f"| map | compress (s) | identical model | ppl[wiki/test, 2048x{windows}] |", "|---|---|---|---|"]
    logits = {}
    for label, traced in (("declared (llama)", False), ("traced", True)):
        out = OUT / f"models-{'traced' if traced else 'declared'}-gptq-w4-g64"
        shutil.rmtree(out, ignore_errors=True)
        saved = arch_module.ARCHITECTURES.pop("llama") if traced else None
        try:
            start = time.perf_counter()
            llmpress.compress("smollm2-135m", "gptq-w4-g64", out=out, progress=False)
            seconds = time.perf_counter() - start
        finally:
            if saved is not None:
                arch_module.ARCHITECTURES["llama"] = saved
        model, tokenizer = llmpress.load(out)
        ids = torch.randint(0, 49152, (1, 64), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits[label] = model(input_ids=ids).logits
        ppl = llmpress.perplexity(model, tokenizer, "wiki/test", windows=windows).ppl
        same = "–" if not traced else ("yes" if torch.equal(logits[label], logits["declared (llama)"]) else "no")
        lines.append(f"| {label} | {seconds:.1f} | {same} | {ppl:.2f} |")
        print(lines[-1], flush=True)
        del model
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-update", action="store_true")
    ap.add_argument("--skip-real", action="store_true", help="only the traces of the full-size configs")
    ap.add_argument("--windows", type=int, default=40)
    args = ap.parse_args()
    lines = [f"{torch.get_num_threads()} threads. Skeletons on the meta device; one block per structure traced with "
             "random tensors (one per distinct shape).", "", *trace_rows()]
    if not args.skip_real:
        lines += ["", "`smollm2-135m`, `gptq-w4-g64`, calibration 128x512 wiki/train seed 0:", "", *real_rows(args.windows)]
    publish(lines, "models", "python bench/models.py", not args.no_update)


if __name__ == "__main__":
    main()
