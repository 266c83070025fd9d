"""Shared fixtures: tiny random models of several architectures, and the real SmolLM2-135M."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The device kernel tests build their tensors on: CUDA where present (Triton compiled for it),
# else the CPU, where Triton runs through its interpreter, which must be chosen before triton is
# imported. The same tests, the same code paths, on either.
TEST_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if TEST_DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests share the converted model and built corpora through one cache across processes.
os.environ.setdefault("LLMPRESS_CACHE", str(Path.home() / ".cache" / "llmpress"))
# Under pytest-xdist every worker gets one thread: two workers of two threads on two cores only
# thrash.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def _tiny_config(arch: str):
    import transformers as tf

    common = dict(vocab_size=49152, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=True, **common)
    if arch == "mistral":
        return tf.MistralConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=16, tie_word_embeddings=True, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=16, sliding_window=16, **common)
    if arch == "opt":
        return tf.OPTConfig(hidden_size=64, ffn_dim=160, num_hidden_layers=2, num_attention_heads=4,
                            word_embed_proj_dim=64, vocab_size=49152, max_position_embeddings=256)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=256, vocab_size=49152)
    small = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, **common)
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=48)
    if arch == "phi3":
        return tf.Phi3Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **small)
    if arch == "olmo2":
        return tf.Olmo2Config(pad_token_id=0, bos_token_id=1, eos_token_id=2, **small)
    if arch == "granite":
        return tf.GraniteConfig(residual_multiplier=0.5, embedding_multiplier=2.0, logits_scaling=2.0, **small)
    if arch == "starcoder2":
        return tf.Starcoder2Config(**small)
    if arch == "mixtral":
        return tf.MixtralConfig(num_local_experts=4, num_experts_per_tok=2, **small)
    if arch == "qwen2_moe":
        return tf.Qwen2MoeConfig(num_experts=4, shared_expert_intermediate_size=64, **moe, **small)
    if arch == "qwen3_moe":
        return tf.Qwen3MoeConfig(num_experts=4, head_dim=16, **moe, **small)
    if arch == "deepseek_v3":   # block 0 dense, block 1 routed + shared experts; MLA attention
        return tf.DeepseekV3Config(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1, kv_lora_rank=16,
                                   q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                   topk_group=1, **moe, **small)
    if arch == "gpt_oss":   # experts fused in a layout llmpress does not split: refused
        return tf.GptOssConfig(num_local_experts=4, num_experts_per_tok=2, head_dim=16, **small)
    # families with no declared map: compressed through the traced (generic) map
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                vocab_size=49152, eos_token_id=2, bos_token_id=1)
    if arch == "olmoe":
        return tf.OlmoeConfig(num_experts=4, num_experts_per_tok=2, pad_token_id=0, eos_token_id=2,
                              **{**small, "intermediate_size": 48})
    raise ValueError(arch)


TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "opt", "gpt2")
# the families mapped since (four dense, four mixture-of-experts), and two only the traced map serves
MAPPED_ARCHS = ("phi3", "olmo2", "granite", "starcoder2", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3")
TRACED_ARCHS = ("gpt_neox", "olmoe")


def pytest_collection_modifyitems(config, items):
    if TEST_DEVICE.type == "cuda":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernel tests run: CUDA when present, else the CPU (Triton's interpreter)."""
    return TEST_DEVICE


@pytest.fixture(scope="session")
def real_model_folder() -> Path:
    """SmolLM2-135M as a safetensors folder (converted from its GGUF once, then cached)."""
    from llmpress.io.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smol_tokenizer(real_model_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_model_folder)


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, smol_tokenizer):
    """``make(arch) -> folder`` of a random tiny model of that architecture with the SmolLM2 tokenizer."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch in made:
            return made[arch]
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
        folder = tmp_path_factory.mktemp(f"tiny-{arch}")
        model.save_pretrained(folder)
        smol_tokenizer.save_pretrained(folder)
        made[arch] = folder
        return folder

    return make
