"""Generation controls: the loop detector, rollback, planning and hand-over between two models' KV
caches, the forced close, and the ``llmpress generate`` command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from llmpress.cli import app
from llmpress.errors import SettingsError
from llmpress.eval.generate import FALLBACK, FORCED, GenerationControls, Generator, SamplingSettings, prompt_ids
from llmpress.eval.loops import (
    LoopSettings,
    find_loop,
    newline_token_ids,
    periodic_suffix,
    repeated_lines,
    saturated_ngram,
    text_loops,
)
from llmpress.io.text import load_text

PROMPT = "The history of the city"


def _random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(1000, 40000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


# --- the detector ----------------------------------------------------------------------------------

@pytest.mark.parametrize("period", [1, 5, 17, 64])
def test_periodic_suffix_finds_a_planted_loop(period):
    lead = _random_tokens(100, 0)
    unit = _random_tokens(period, 1)
    copies = max(3, -(-24 // period))
    tokens = lead + unit * copies + unit[: period // 2]
    found = periodic_suffix(tokens, max_period=64, min_repeats=3, min_span=24)
    assert found is not None
    assert found.period == period
    assert found.start == len(lead)            # the first copy begins right after the lead
    assert tokens[found.start:found.first_copy_end] == unit


def test_periodic_suffix_needs_the_repeats_and_the_span():
    unit = _random_tokens(10, 1)
    assert periodic_suffix(_random_tokens(50, 0) + unit * 2, 64, 3, 24) is None      # two copies
    assert periodic_suffix(_random_tokens(50, 0) + [7] * 10, 64, 3, 24) is None      # span 10 < 24
    assert periodic_suffix(_random_tokens(50, 0) + [7] * 24, 64, 3, 24).period == 1


def test_ngram_saturation_finds_a_loop_with_a_changing_counter():
    phrase = _random_tokens(14, 2)
    tokens = _random_tokens(40, 0)
    starts = []
    for step in range(4):
        starts.append(len(tokens))
        tokens += [30000 + step] + phrase      # "Step k: same words", the counter breaks periodicity
    assert periodic_suffix(tokens, 64, 3, 24) is None
    found = saturated_ngram(tokens, n=12, repeats=4)
    assert found is not None and found.start == starts[0] + 1 and found.period == 15


def test_repeated_lines():
    newline = 198
    line = _random_tokens(6, 3)
    tokens = _random_tokens(20, 0) + [newline] + (line + [newline, newline]) * 3
    found = repeated_lines(tokens, frozenset({newline}), repeats=3)
    assert found is not None and found.start == 21 and tokens[found.start:found.start + 6] == line
    assert repeated_lines(tokens[:-9], frozenset({newline}), repeats=3) is None


def test_detector_is_silent_on_long_real_text(smol_tokenizer):
    tokens = smol_tokenizer(load_text("wiki/test")[:40000], add_special_tokens=False).input_ids[:3000]
    settings, newlines = LoopSettings(), newline_token_ids(smol_tokenizer)
    assert 198 in newlines
    fired = [n for n in range(50, len(tokens), 7) if find_loop(tokens[:n], settings, newlines) is not None]
    assert fired == []


def test_text_criterion():
    assert text_loops("Intro text. " + "The answer is 4. " * 6)
    assert not text_loops("The answer is 4. " * 3)                       # three copies are not enough
    assert not text_loops(load_text("wiki/test")[:20000])


def test_settings_are_checked():
    with pytest.raises(SettingsError):
        LoopSettings(min_repeats=1)
    with pytest.raises(SettingsError):
        GenerationControls(loop_rescue="restart")
    with pytest.raises(SettingsError):
        SamplingSettings(top_p=0)


# --- generation --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_model_factory, smol_tokenizer):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_factory("llama")
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), smol_tokenizer


@pytest.fixture(scope="module")
def other_tiny(tiny_model_factory):
    """A random model with the same vocabulary and an untied head: a fallback whose tokens differ
    (a random tied model tends to repeat its last token, as the tiny llama does)."""
    from transformers import AutoModelForCausalLM

    from tests.conftest import _tiny_config

    torch.manual_seed(1)
    return AutoModelForCausalLM.from_config(_tiny_config("mistral"), dtype=torch.float32).eval()


def _hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_plain_generation_equals_transformers_greedy(tiny):
    model, tok = tiny
    result = Generator(model, tok)(PROMPT, max_new_tokens=40)
    assert result.tokens == _hf_greedy(model, prompt_ids(tok, PROMPT, False), 40)[:len(result.tokens)]
    assert result.finish in ("eos", "budget") and result.steps["compressed"] >= len(result.tokens)


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_planning_by_the_same_model_is_plain_generation(tiny_model_factory, smol_tokenizer, arch):
    """The hand-over re-prefills the compressed model's cache from the kept tokens; with the same
    weights on both sides the tokens cannot change (gemma2: a sliding-window cache, 16 tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32).eval()
    plain = Generator(model, smol_tokenizer)(PROMPT, max_new_tokens=48)
    for plan in (1, 7, 30):
        planned = Generator(model, smol_tokenizer, fallback=model, controls=GenerationControls(plan_tokens=plan))(
            PROMPT, max_new_tokens=48)
        assert planned.tokens == plain.tokens
        assert planned.sources[:plan] == [FALLBACK] * min(plan, len(plain.tokens))


def test_plan_tokens_come_from_the_fallback(tiny, other_tiny):
    model, tok = tiny
    ids = prompt_ids(tok, PROMPT, False)
    result = Generator(model, tok, fallback=other_tiny, controls=GenerationControls(plan_tokens=6))(
        PROMPT, max_new_tokens=20)
    assert result.tokens[:6] == _hf_greedy(other_tiny, ids, 6)
    assert result.tokens[6:] == _hf_greedy(model, ids + result.tokens[:6], 14)[:len(result.tokens) - 6]
    assert result.steps == {"compressed": len(result.tokens) - 6, "fallback": 6}


def _looping_run(model, tok):
    """A prompt on which the tiny random model loops (random models fall into repetition fast)."""
    settings = LoopSettings(min_span=12)
    plain = Generator(model, tok)(PROMPT, max_new_tokens=120)
    found = next((find_loop(plain.tokens[:n], settings) for n in range(1, len(plain.tokens) + 1)
                  if find_loop(plain.tokens[:n], settings) is not None), None)
    assert found is not None, "the tiny model no longer loops on this prompt: pick another"
    return settings, plain, found


def test_commit_keeps_the_first_copy_and_stops(tiny):
    model, tok = tiny
    settings, plain, found = _looping_run(model, tok)
    result = Generator(model, tok, controls=GenerationControls(loop_rescue="commit", loop=settings))(
        PROMPT, max_new_tokens=120)
    assert result.finish == "commit" and len(result.loops) == 1
    assert result.tokens == plain.tokens[:found.first_copy_end]


def test_fallback_rolls_back_to_the_loop_start_and_the_fallback_continues(tiny, other_tiny):
    model, tok = tiny
    settings, plain, found = _looping_run(model, tok)
    controls = GenerationControls(loop_rescue="fallback", loop=settings, fallback_tokens=10, max_rescues=1)
    result = Generator(model, tok, fallback=other_tiny, controls=controls)(PROMPT, max_new_tokens=120)
    event = result.loops[0]
    assert event.action == "fallback" and event.loop.start == found.start
    kept = plain.tokens[:found.start]
    assert result.tokens[:found.start] == kept                       # the prefix, byte for byte
    assert tok.decode(result.tokens[:found.start]) == tok.decode(kept)
    ids = prompt_ids(tok, PROMPT, False)
    assert result.tokens[found.start:found.start + 10] == _hf_greedy(other_tiny, ids + kept, 10)
    assert result.sources[found.start:found.start + 10] == [FALLBACK] * 10
    assert result.steps["fallback"] >= 10


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_writer_cache_after_a_rollback_equals_a_fresh_forward(tiny_model_factory, arch):
    """A writer whose sequence was cut back and extended differently predicts what a fresh forward
    over the new sequence predicts: llama's cache is cropped, gemma2's sliding window (16) past its
    size cannot be, and is rebuilt from the kept tokens."""
    from transformers import AutoModelForCausalLM

    from llmpress.eval.generate import _Writer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_factory(arch), dtype=torch.float32).eval()
    first, other = _random_tokens(40, 5), _random_tokens(6, 6)
    writer = _Writer(model)
    for n in range(8, 41, 4):
        writer.next_logits(first[:n])
    second = first[:25] + other
    with torch.no_grad():
        fresh = model(input_ids=torch.tensor([second])).logits[0, -1]
    torch.testing.assert_close(writer.next_logits(second), fresh, rtol=1e-5, atol=1e-5)
    assert writer.held == second


def test_forced_close(tiny):
    model, tok = tiny
    controls = GenerationControls(close_with="\nThe answer is", close_tokens=5)
    result = Generator(model, tok, controls=controls)(PROMPT, max_new_tokens=12)
    closing = tok("\nThe answer is", add_special_tokens=False).input_ids
    assert result.finish == "budget" and result.closed
    assert result.tokens[12:12 + len(closing)] == closing
    assert result.sources[12:12 + len(closing)] == [FORCED] * len(closing)
    assert len(result.tokens) <= 12 + len(closing) + 5


def test_sampling_is_seeded(tiny):
    model, tok = tiny
    sampling = SamplingSettings(do_sample=True, temperature=1.5, top_k=0, seed=3)
    a = Generator(model, tok, sampling=sampling)(PROMPT, max_new_tokens=20)
    b = Generator(model, tok, sampling=sampling)(PROMPT, max_new_tokens=20)
    assert a.tokens == b.tokens


def test_streamed_text_is_the_result(tiny, other_tiny):
    model, tok = tiny
    settings, _, _ = _looping_run(model, tok)
    shown = []

    def on_text(delta, event):
        if event == "rollback":
            assert "".join(shown).endswith(delta)
            shown[:] = ["".join(shown)[: len("".join(shown)) - len(delta)]]
        else:
            shown.append(delta)

    controls = GenerationControls(loop_rescue="fallback", loop=settings, fallback_tokens=8)
    result = Generator(model, tok, fallback=other_tiny, controls=controls)(PROMPT, max_new_tokens=80, on_text=on_text)
    assert "".join(shown) == result.text


# --- the command --------------------------------------------------------------------------------

def test_cli_generate_writes_records(tiny_model_factory, tmp_path):
    folder = tiny_model_factory("llama")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"q": "One"}) + "\n\n" + json.dumps({"q": "Two"}) + "\n")
    out = tmp_path / "r.jsonl"
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(folder), "--prompts", f"{prompts}:q", "--max-new-tokens", "8",
                              "--loop-rescue", "commit", "--output", str(out)])
    assert res.exit_code == 0, res.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["One", "Two"] and all(r["new_tokens"] <= 8 for r in records)
    assert not (tmp_path / "r.jsonl.partial").exists()
    res = runner.invoke(app, ["generate", str(folder), "--prompt", "x", "--output", str(out)])
    assert res.exit_code == 2 and "exists" in res.output
    res = runner.invoke(app, ["generate", str(folder), "--prompt", "One", "--max-new-tokens", "8", "--loop-rescue",
                              "commit", "--output", str(out), "--overwrite"])
    assert res.exit_code == 0, res.output
    (single,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert single == {**records[0], "seconds": single["seconds"]}      # streamed or not, the same generation
    assert single["text"] in res.stdout


@pytest.mark.parametrize("args, message", [
    ([], "exactly one of"),
    (["--prompt", "x", "--loop", "window"], "KEY=INTEGER"),
    (["--prompt", "x", "--loop-rescue", "fallback"], "--fallback"),
    (["--prompt", "x", "--loop-rescue", "again"], "commit or fallback"),
    (["--prompts", "missing.jsonl"], "no file"),
])
def test_cli_generate_errors_are_one_line(tiny_model_factory, args, message):
    res = CliRunner().invoke(app, ["generate", str(tiny_model_factory("llama")), *args])
    assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output


def test_api_generate_plans_with_the_recorded_base_model(tiny_model_factory, tmp_path):
    """``llmpress.generate`` on a compressed folder loads its recorded base model as the fallback:
    the plan's tokens are the dense model's own greedy tokens."""
    from transformers import AutoModelForCausalLM

    import llmpress

    base = tiny_model_factory("llama")
    out = tmp_path / "w4"
    llmpress.compress(base, "rtn-w4", out=out, progress=False)
    assert llmpress.api.recorded_base_model(out) == str(base)
    result = llmpress.generate(out, PROMPT, max_new_tokens=10, plan_tokens=4)
    _, tok = llmpress.load(out)
    dense = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    assert result.tokens[:4] == _hf_greedy(dense, prompt_ids(tok, PROMPT, False), 4)
    assert result.steps["fallback"] == 4
    with pytest.raises(TypeError, match="unknown options"):
        llmpress.generate(out, PROMPT, plan_token=4)
    plain = llmpress.generate(base, [PROMPT, "Two"], max_new_tokens=6)
    assert len(plain) == 2 and plain[0].steps["fallback"] == 0
