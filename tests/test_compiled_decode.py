"""The compiled decoding step (``llmpress.eval.compiled``) against eager decoding: the same
tokens and logits on tiny random models, packed layers included, rollbacks, and the eager
fallback where compilation fails."""

from __future__ import annotations

import pytest
import torch

from llmpress.eval.compiled import CompiledDecoder, cache_length, greedy_tokens


@torch.no_grad()
def _eager_steps(model, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    """The logits eager decoding gives after the prompt and after each of ``tokens`` (dynamic cache)."""
    out = model(input_ids=prompt, use_cache=True)
    logits, cache = [out.logits[0, -1]], out.cache
    for token in tokens[0, :-1]:
        out = model(input_ids=token.reshape(1, 1), cache=cache, use_cache=True)
        logits.append(out.logits[0, -1])
        cache = out.cache
    return logits


@torch.no_grad()
def _compiled_steps(decoder: CompiledDecoder, prompt: torch.Tensor, tokens: torch.Tensor) -> list[torch.Tensor]:
    logits = [decoder.logits(prompt, 0)]
    for i, token in enumerate(tokens[0, :-1]):
        logits.append(decoder.logits(token.reshape(1, 1), prompt.shape[1] + i))
    return logits


def test_cache_lengths_are_powers_of_two_from_the_minimum():
    assert cache_length(1) == cache_length(256) == 256
    assert cache_length(257) == 512 and cache_length(1000) == 1024


@pytest.mark.parametrize("recipe", ["gptq-w4-g64", "shiftadd-w3", "svdllm-30"])
def test_a_compiled_step_computes_what_the_eager_step_does(tiny_model_factory, tmp_path, recipe):
    """Packed layers in the graph: torch's int4 GEMM with q/k/v and gate/up as one GEMM each, the
    C++ LUT GEMV and half-precision GEMV as ``torch.ops.llmpress`` operators, the fp16 head."""
    import llmpress

    llmpress.compress(tiny_model_factory("llama"), recipe, out=tmp_path / "m", nsamples=8, seqlen=32, progress=False,
                      dtype="float16")
    model, _ = llmpress.load(tmp_path / "m")
    prompt = torch.randint(0, 1000, (1, 7), generator=torch.Generator().manual_seed(1))
    decoder = CompiledDecoder(model, 32)
    tokens = greedy_tokens(decoder, prompt, 10)
    assert decoder.compiled
    compiled, eager = _compiled_steps(decoder, prompt, tokens), _eager_steps(model, prompt, tokens)
    for c, e in zip(compiled, eager, strict=True):   # bf16 activations in the int4 GEMM: rounding may differ
        assert (c - e).abs().max() <= 2 ** -6 * e.abs().max()
    assert torch.equal(tokens[0], torch.stack([e.argmax() for e in eager]))


def test_decoders_of_two_models_keep_their_own_weights_and_caches(tiny_model_factory):
    """One traced graph may serve several decoders: weights and caches are its inputs, not constants."""
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    b = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    with torch.no_grad():
        for p in b.parameters():
            p.mul_(1.5)
    prompt = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(2))
    da, db = CompiledDecoder(a, 24), CompiledDecoder(b, 24)
    ta, tb = greedy_tokens(da, prompt, 8), greedy_tokens(db, prompt, 8)   # interleaved use follows
    assert da.compiled and db.compiled
    for decoder, model, tokens in ((da, a, ta), (db, b, tb), (da, a, ta)):
        compiled, eager = _compiled_steps(decoder, prompt, tokens), _eager_steps(model, prompt, tokens)
        for c, e in zip(compiled, eager, strict=True):
            assert torch.allclose(c, e, rtol=1e-4, atol=1e-4)


@torch._dynamo.config.patch(recompile_limit=2)
def test_more_decoders_than_dynamos_recompile_limit_all_compile():
    """Each decoder's graphs are its own: models loaded one after another in a process (a benchmark
    of many recipes) never run out of dynamo's per-function budget of graphs (lowered to 2 here)."""
    import transformers as tf

    prompt = torch.randint(0, 100, (1, 4), generator=torch.Generator().manual_seed(5))
    for i in range(4):   # other shapes each time: a shared function would need a new graph for each
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=48 + 16 * i, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=100)
        model = tf.AutoModelForCausalLM.from_config(config).eval()
        decoder = CompiledDecoder(model, 16)
        greedy_tokens(decoder, prompt, 3)
        assert decoder.compiled, i


def test_a_cut_back_sequence_continues_as_if_it_had_never_been_longer(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    seq = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(3))
    fresh, used = CompiledDecoder(model, 32), CompiledDecoder(model, 32)
    used.logits(seq, 0)                                   # 12 tokens in, then back to 6
    assert torch.allclose(used.logits(seq[:, 6:7], 6), fresh.logits(seq[:, :7], 0), rtol=1e-5, atol=1e-5)
    assert torch.allclose(used.logits(seq[:, 7:8], 7), fresh.logits(seq[:, 7:8], 7), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="past"):
        used.logits(seq[:, :1], 10)
    with pytest.raises(ValueError, match="static cache"):
        used.logits(torch.zeros(1, 300, dtype=torch.long), 0)


def test_a_step_that_cannot_be_compiled_says_so_once_and_runs_eagerly(tiny_model_factory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    prompt = torch.randint(0, 1000, (1, 5), generator=torch.Generator().manual_seed(4))
    decoder = CompiledDecoder(model, 24)

    def broken(*_):
        raise RuntimeError("inductor cannot take this\nsecond line")

    decoder._compiled = broken
    with pytest.warns(RuntimeWarning, match="could not be compiled .*inductor cannot take this"):
        tokens = greedy_tokens(decoder, prompt, 6)
    assert not decoder.compiled
    eager = _eager_steps(model, prompt, tokens)
    assert torch.equal(tokens[0], torch.stack([e.argmax() for e in eager]))


def test_generation_with_a_compiled_step_writes_the_same_tokens(tiny_model_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    from llmpress.eval.generate import COMPRESSED, GenerationControls, Generator

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory("llama")).eval()
    controls = GenerationControls(close_with=" The answer is", close_tokens=3)
    plain = Generator(model, smol_tokenizer, controls=controls)
    compiled = Generator(model, smol_tokenizer, controls=controls, compile=True)
    for prompt in ("The river flows", "Once upon a time there was"):
        a, b = plain(prompt, max_new_tokens=12), compiled(prompt, max_new_tokens=12)
        assert a.tokens == b.tokens and a.sources == b.sources
    writer = compiled._compiled[COMPRESSED]
    assert writer.decoder.compiled and writer.decoder.max_length == 256   # one writer, kept for both prompts
    # other controls over the same models reuse the compiled writer and still write what eager does
    bare = GenerationControls()
    again = compiled.with_controls(bare)
    assert again(prompt, max_new_tokens=12).tokens == plain.with_controls(bare)(prompt, max_new_tokens=12).tokens
    assert again._compiled[COMPRESSED] is writer
