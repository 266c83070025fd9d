"""Rotations: Hadamard constructions, fused rotations that leave the function unchanged, the
online Hadamard module, and their save/load/export paths."""

from __future__ import annotations

import pytest
import torch

import llmpress
from llmpress.compress.recipe import parse_recipe
from llmpress.compress.rotate.hadamard import randomized_hadamard
from llmpress.errors import LlmpressError, RecipeError
from llmpress.formats.hadamard import HadamardError, apply_hadamard, hadamard_factors, hadamard_matrix, paley
from llmpress.layers import OnlineHadamard, QuantLinear

from .conftest import TINY_ARCHS

# Widths the supported models use: SmolLM2 (576, 1536, head 64), Qwen2.5 (896, 4864), Llama
# (4096, 11008, 14336), tiny test models (64, 160, 16).
WIDTHS = (16, 64, 160, 576, 896, 1536, 4096, 4864, 11008)


@pytest.mark.parametrize("order", [12, 20, 28, 36, 44, 60, 76, 108, 140])
def test_paley_constructions_are_hadamard(order):
    h = paley(order)
    assert h is not None and set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, order * torch.eye(order, dtype=torch.float64))


@pytest.mark.parametrize("n", WIDTHS)
def test_hadamard_of_every_width_is_orthogonal_and_the_fast_transform_equals_it(n):
    factors = hadamard_factors(n)
    assert max(f.shape[0] for f in factors) <= max(128, factors[0].shape[0])   # never one n × n factor
    x = torch.randn(3, n, dtype=torch.float64)
    if n <= 4864:
        h = hadamard_matrix(n)
        assert (h @ h.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6
        assert (apply_hadamard(x, factors) - x @ h).abs().max() < 1e-10
        q = randomized_hadamard(n, seed=1)
        assert (q @ q.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6
    # an orthogonal map keeps norms; applying Hᵀ undoes it
    y = apply_hadamard(x, factors)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-10)
    back = apply_hadamard(y, tuple(f.T for f in factors))
    assert (back - x).abs().max() < 1e-10


@pytest.mark.parametrize("n", [64, 160, 576, 1536, 4864])
def test_the_online_hadamard_rotates_decoding_rows_like_long_inputs(n, monkeypatch):
    from llmpress.kernels import cpu_ext

    module = OnlineHadamard(n)
    module.signs.copy_(torch.randint(0, 2, (n,)) * 2.0 - 1)
    x = torch.randn(2, 3, n, dtype=torch.float64)
    expected = x @ (module.signs[:, None].double() * hadamard_matrix(n))
    assert (module.rotate(x) - expected).abs().max() < 1e-10                # ≤ 16 rows: folded factors
    long = x.repeat(1, 7, 1)                                                 # 42 rows: the long-input path
    assert (module.rotate(long) - expected.repeat(1, 7, 1)).abs().max() < 1e-10
    # fp32 decoding rows: the C++ kernel (fast Walsh-Hadamard after the Paley factor) where it is
    # built, else the folded factors
    tolerance = 1e-5 * float(expected.abs().max())
    assert (module.rotate(x.float()).double() - expected).abs().max() < tolerance
    with monkeypatch.context() as patch:
        patch.setattr(cpu_ext, "extension", lambda: None)
        fresh = OnlineHadamard(n)
        fresh.signs.copy_(module.signs)
        assert (fresh.rotate(x.float()).double() - expected).abs().max() < tolerance


def test_a_width_without_a_hadamard_gets_a_clear_error():
    with pytest.raises(HadamardError, match="no Hadamard matrix known for width 6"):
        hadamard_factors(6)


# -- fused rotations on tiny random models ---------------------------------------------------------

def _rotation(**kw):
    return {"method": "rht", "seed": 0, **kw}


def _recipe(*layer_stages, **rotation):
    return parse_recipe({"name": "t", "stages": [_rotation(**rotation), *layer_stages]})


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory, tiny_model_factory):
    """A tiny model of ``arch`` whose norm scales and biases are random (a fresh model's norms
    are all ones, which would hide a norm that is folded wrong)."""
    made = {}

    def make(arch: str):
        if arch in made:
            return made[arch]
        model, tok = llmpress.load(tiny_model_factory(arch))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name or ".ln_" in name or name.endswith("bias"):
                    p.add_(torch.randn(p.shape, generator=g) * 0.3)
        folder = tmp_path_factory.mktemp(f"perturbed-{arch}")
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        made[arch] = folder
        return folder

    return make


def _logits(model, seed=0):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


# (block 0's online linear, whether the residual stream is rotated and the head untied)
ONLINE = {"llama": "model.layers.0.mlp.down_proj", "mistral": "model.layers.0.mlp.down_proj",
          "qwen2": "model.layers.0.mlp.down_proj", "qwen3": "model.layers.0.mlp.down_proj",
          "gemma2": "model.layers.0.mlp.down_proj", "gemma3": "model.layers.0.mlp.down_proj",
          "opt": "model.decoder.layers.0.fc2", "gpt2": "transformer.h.0.mlp.c_proj"}


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("options", [{}, {"online": False, "heads": False}])
def test_rotated_full_precision_model_has_the_same_logits(arch, options, perturbed, tmp_path):
    folder = perturbed(arch)
    llmpress.compress(folder, _recipe(**options), out=tmp_path / "rot", progress=False)
    dense, _ = llmpress.load(folder)
    rotated, _ = llmpress.load(tmp_path / "rot")
    a, b = _logits(dense), _logits(rotated)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    # ... and the weights really changed where the family allows it
    online = options.get("online", True)
    residual = not arch.startswith("gemma")
    assert isinstance(rotated.get_submodule(ONLINE[arch]), OnlineHadamard) == online
    if online or residual:
        inner = rotated.get_submodule(ONLINE[arch] + (".linear" if online else ""))
        stock = dense.get_submodule(ONLINE[arch])   # GPT-2's Conv1D holds [in, out]; llmpress every linear [out, in]
        assert not torch.allclose(inner.weight, stock.weight.T if type(stock).__name__ == "Conv1D" else stock.weight)
    if residual:
        assert not rotated.config.tie_word_embeddings


def test_rotation_then_gptq_reloads_exactly_and_resumes(perturbed, tmp_path, monkeypatch):
    from .test_pipeline import crash_then_resume

    folder = perturbed("llama")
    recipe = _recipe({"method": "gptq", "bits": 3, "group_size": 32})
    result = llmpress.compress(folder, recipe, out=tmp_path / "q", nsamples=4, seqlen=32, progress=False,
                               keep_model=True)
    reloaded, _ = llmpress.load(tmp_path / "q")
    wrapper = reloaded.get_submodule("model.layers.1.mlp.down_proj")
    assert isinstance(wrapper, OnlineHadamard) and isinstance(wrapper.linear, QuantLinear)
    assert (_logits(result.model) - _logits(reloaded)).abs().max() <= 1e-5
    assert "model.layers.1.mlp.down_proj.linear" in {r.name for r in result.records}
    crash_then_resume(folder, recipe, tmp_path / "resume", monkeypatch)


def test_dense_export_folds_the_online_hadamard_into_plain_weights(perturbed, tmp_path):
    from transformers import AutoModelForCausalLM

    from llmpress.io.export import ExportError, export

    folder = perturbed("qwen2")
    llmpress.compress(folder, _recipe({"method": "rtn", "bits": 4, "group_size": 32}), out=tmp_path / "q",
                      progress=False)
    export(tmp_path / "q", tmp_path / "dense", "dense", dtype="float32")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    ours, _ = llmpress.load(tmp_path / "q")
    assert (_logits(plain) - _logits(ours)).abs().max() <= 1e-4
    with pytest.raises(ExportError, match="online Hadamard"):
        export(tmp_path / "q", tmp_path / "ct", "compressed-tensors")
    assert not (tmp_path / "ct").exists()


def test_unsupported_model_and_misplaced_rotation_are_refused(tiny_model_factory, tmp_path, monkeypatch):
    import dataclasses

    from llmpress.compress import run

    original = run.arch_for
    monkeypatch.setattr(run, "arch_for", lambda m: dataclasses.replace(original(m), rotation=None))
    with pytest.raises(LlmpressError, match="rotations are not supported for the llama family"):
        llmpress.compress(tiny_model_factory("llama"), _recipe(), out=tmp_path / "g", progress=False)
    assert not (tmp_path / "g").exists()
    with pytest.raises(RecipeError, match="must come first"):
        parse_recipe({"stages": [{"method": "rtn", "bits": 4}, _rotation()]})


def test_tampered_online_hadamard_manifest_is_refused(perturbed, tmp_path):
    import json

    from .test_cli import _run

    folder = perturbed("llama")
    llmpress.compress(folder, _recipe(), out=tmp_path / "rot", progress=False)
    result, _ = _run("inspect", tmp_path / "rot")
    assert result.exit_code == 0
    assert "rotation: rht seed 0, residual stream, within heads, online Hadamard (160) on 3 modules" in " ".join(
        result.output.split())   # rich wraps long lines
    cfg_path = tmp_path / "rot" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["transforms"][0]["online_hadamard"]["size"] = 7
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(llmpress.api.ModelLoadError, match="not that wide"):
        llmpress.load(tmp_path / "rot")


def test_row_chunked_rotation_equals_the_whole_product_in_place_and_across_dtypes(monkeypatch):
    from llmpress.compress.rotate import fuse

    monkeypatch.setattr(fuse, "_CHUNK_BYTES", 5 * 8 * 64)   # 5 rows per chunk: a ragged last chunk
    g = torch.Generator().manual_seed(0)
    w, scale, q = torch.randn(23, 64, generator=g), torch.rand(64, generator=g) + 0.5, randomized_hadamard(64, 3)
    whole = ((w.double() * scale.double()) @ q).float()
    assert torch.equal(fuse.rotate_input(w, q, scale), whole)
    assert torch.equal(fuse.rotate_input(w.half(), q, scale, dtype=torch.float32), ((w.half().double() * scale.double()) @ q).float())
    inplace = w.clone()
    assert fuse.rotate_input(inplace, q, scale, out=inplace) is inplace and torch.equal(inplace, whole)
    with pytest.raises(fuse.RotationError, match="float16's range"):
        fuse.rotate_input(torch.full((2, 64), 60000.0, dtype=torch.float16), q)


@pytest.mark.parametrize("n", [64, 160, 576, 1536, 4864])
def test_the_fast_rht_map_equals_the_matrix_and_a_replaced_rotation_uses_its_own(n, tiny_model_factory):
    from dataclasses import replace

    from llmpress.compress.rotate.fuse import _householder_vector, _reflected, mean_preserving
    from llmpress.compress.rotate.hadamard import random_signs, signed_hadamard, signed_hadamard_map

    signs = random_signs(n, 7)
    x = torch.randn(5, n, dtype=torch.float64)
    q = signed_hadamard(signs)
    assert torch.allclose(signed_hadamard_map(signs)(x), x @ q, rtol=0, atol=1e-12)
    layer = _reflected(_householder_vector(q), signed_hadamard_map(signs))   # LayerNorm families
    assert torch.allclose(layer(x), x @ mean_preserving(q), rtol=0, atol=1e-12)
    if n == 64:
        from llmpress.compress.arch import arch_for
        from llmpress.compress.rotate.fuse import randomized_hadamard_rotation
        from llmpress.io.models import load_dense

        model = load_dense(tiny_model_factory("llama"))
        rotation = randomized_hadamard_rotation(arch_for(model), model.config, seed=0)
        assert callable(rotation.times_q)
        fitted = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
        assert replace(rotation, q=fitted, method="harp").times_q is fitted


def test_rotate_rest_leaves_a_shared_or_widened_input_as_it_was(tiny_model_factory):
    """A tied head reads the embeddings before they are rotated in place; a tensor rotated into
    another dtype, or held under two names, is not written over."""
    from llmpress.compress.arch import arch_for
    from llmpress.compress.rotate.fuse import randomized_hadamard_rotation
    from llmpress.io.models import load_dense

    model = load_dense(tiny_model_factory("llama"))
    rotation = randomized_hadamard_rotation(arch_for(model), model.config, seed=0)
    e = model.model.embed_tokens.weight.detach().clone()
    gamma = torch.rand(e.shape[1]) + 0.5
    q = rotation.q
    tensors = {"model.embed_tokens.weight": e.clone(), "model.norm.weight": gamma}
    out = rotation.rotate_rest(tensors)
    assert out["model.embed_tokens.weight"] is tensors["model.embed_tokens.weight"]   # in place
    assert torch.equal(out["model.embed_tokens.weight"], (e.double() @ q).float())
    assert torch.equal(out["lm_head.weight"], ((e.double() * gamma.double()) @ q).float())   # the unrotated E
    assert torch.equal(out["model.norm.weight"], torch.ones_like(gamma))
    kept = {"model.embed_tokens.weight": e.clone(), "model.norm.weight": gamma}
    wide = rotation.rotate_rest(kept, head=False, dtypes={"model.embed_tokens.weight": torch.float64})
    assert torch.equal(kept["model.embed_tokens.weight"], e) and "lm_head.weight" not in wide
    assert wide["model.embed_tokens.weight"].dtype == torch.float64
    both = {"model.embed_tokens.weight": e.clone(), "model.norm.weight": gamma}
    both["lm_head.weight"] = both["model.embed_tokens.weight"]
    rotation.rotate_rest(both)
    assert torch.equal(both["lm_head.weight"], e)


# -- HARP ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [64, 160, 576])
def test_harp_starts_at_the_randomized_hadamard_and_stays_orthogonal(n):
    from llmpress.compress.rotate.harp import ButterflyOrthogonal

    q = ButterflyOrthogonal(n, seed=5)
    assert (q.matrix() - randomized_hadamard(n, seed=5)).abs().max() < 1e-6
    with torch.no_grad():
        for theta in q.thetas:
            theta.normal_(0, 0.5)
    m = q.matrix()
    assert (m @ m.T - torch.eye(n, dtype=torch.float64)).abs().max() < 1e-6
    x = torch.randn(4, n)
    assert torch.allclose(q(x).double(), x.double() @ m, atol=1e-5)


def test_harp_fit_lowers_the_proxy_of_a_single_matrix():
    from llmpress.compress.rotate.harp import ProxyTerm, fit_harp

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.2, 3, 64)   # uneven columns
    x = torch.randn(512, 64, generator=g)
    term = ProxyTerm("model.layers.0.mlp.up_proj", w, reader=True, hessian=x.T @ x)
    result = fit_harp([term], 64, bits=3, group_size=16, sym=False, seed=0, steps=40, lr=0.03, refresh=1)
    assert result.final < 0.97 * result.initial          # it learns something...
    assert result.history[0][1] == result.initial         # ...starting from the RHT
    assert (result.q @ result.q.T - torch.eye(64, dtype=torch.float64)).abs().max() < 1e-6


def test_harp_statistics_stream_block_by_block_and_equal_the_residual_stream(perturbed):
    """The Hessians of every block's first norm, gathered one streamed block at a time, equal the
    Gram matrix of that block's normalised input taken from a whole-model forward, and the
    streamed pass builds the same terms as one over the model held whole."""
    from llmpress.compress.recipe import parse_recipe as parse
    from llmpress.compress.rotate.harp import collect_proxy_terms
    from llmpress.compress.run import _prepare, _StreamedWeights

    folder = perturbed("llama")
    recipe = parse({"stages": [{"method": "harp", "variant": "shared", "steps": 1, "bits": 3, "group_size": 32}]})
    job = _prepare(folder, recipe, "unused", None, 4, 32, 0, [], False)
    rotation = job.rotation
    streamed = _StreamedWeights(job, None)
    terms = collect_proxy_terms(streamed.model, rotation.arch, job.windows, rotation, weights=streamed, batch_size=3)
    assert all(p.device.type == "meta" for p in streamed.model.model.layers.parameters())   # released
    whole, _ = llmpress.load(folder)
    reference = collect_proxy_terms(whole, rotation.arch, job.windows, rotation, batch_size=3)
    assert [t.name for t in terms] == [t.name for t in reference]
    for a, b in zip(terms, reference, strict=True):
        assert torch.equal(a.rows, b.rows)
        assert torch.equal(a.hessian, b.hessian) if a.reader else torch.equal(a.h_diag, b.h_diag)
    with torch.no_grad():
        states = whole(input_ids=job.windows, output_hidden_states=True).hidden_states
    for i, layer in enumerate(whole.model.layers):
        x = states[i].reshape(-1, states[i].shape[-1]).double()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + layer.input_layernorm.variance_epsilon)
        h = next(t.hessian for t in terms if t.name == f"model.layers.{i}.self_attn.q_proj")
        assert torch.allclose(h.double(), x.T @ x, rtol=1e-4, atol=1e-3 * float((x.T @ x).abs().max()))


def test_harp_rotation_keeps_the_function(perturbed, tmp_path, tiny_model_factory):
    folder = perturbed("llama")
    recipe = parse_recipe({"stages": [{"method": "harp", "variant": "shared", "steps": 3, "refresh": 1, "bits": 3, "group_size": 32}]})
    llmpress.compress(folder, recipe, out=tmp_path / "h", nsamples=4, seqlen=32, progress=False)
    dense, _ = llmpress.load(folder)
    rotated, _ = llmpress.load(tmp_path / "h")
    a = _logits(dense)
    assert (a - _logits(rotated)).abs().max() <= 1e-4 * a.abs().max()
    assert (tmp_path / "h" / "llmpress-harp.safetensors").exists()
    assert (tmp_path / "h" / "llmpress-harp.png").exists()
    with pytest.raises(LlmpressError, match="gemma family cannot"):
        llmpress.compress(tiny_model_factory("gemma2"), recipe, out=tmp_path / "g", nsamples=4, seqlen=32,
                          progress=False)
    with pytest.raises(RecipeError, match="needs `bits`"):
        llmpress.compress(folder, parse_recipe({"stages": [{"method": "harp", "variant": "shared"}]}), out=tmp_path / "x", progress=False)


def test_resume_reuses_the_harp_fit(perturbed, tmp_path, monkeypatch):
    from llmpress.compress import pipeline
    from llmpress.compress.rotate import harp

    folder = perturbed("llama")
    recipe = parse_recipe({"stages": [{"method": "harp", "variant": "shared", "steps": 3, "refresh": 1},
                                      {"method": "rtn", "bits": 3, "group_size": 32}]})
    real = pipeline._compress_block

    def crash_on_block_1(ctx, *args, **kwargs):
        if ctx.index == 1:
            raise RuntimeError("simulated crash")
        return real(ctx, *args, **kwargs)

    monkeypatch.setattr(pipeline, "_compress_block", crash_on_block_1)
    with pytest.raises(RuntimeError, match="simulated crash"):
        llmpress.compress(folder, recipe, out=tmp_path / "h", nsamples=4, seqlen=32, progress=False)
    monkeypatch.setattr(pipeline, "_compress_block", real)

    def no_refit(*args, **kwargs):
        raise AssertionError("the resumed run fitted HARP again")

    monkeypatch.setattr(harp, "fit_harp", no_refit)
    result = llmpress.compress(folder, recipe, out=tmp_path / "h", nsamples=4, seqlen=32, progress=False,
                               resume=True, keep_model=True)
    reloaded, _ = llmpress.load(tmp_path / "h")
    assert (_logits(result.model) - _logits(reloaded)).abs().max() <= 1e-5


def test_harp_reuse_takes_an_earlier_fit_and_refuses_a_bad_one(perturbed, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from llmpress.compress.rotate import harp

    folder = perturbed("llama")
    fit = {"method": "harp", "variant": "shared", "steps": 3, "refresh": 1}
    llmpress.compress(folder, parse_recipe({"stages": [fit, {"method": "rtn", "bits": 3, "group_size": 32}]}),
                      out=tmp_path / "rtn", nsamples=4, seqlen=32, progress=False)
    fitted = load_file(str(tmp_path / "rtn" / "llmpress-harp.safetensors"))["q"]

    def no_refit(*args, **kwargs):
        raise AssertionError("a reused rotation was fitted again")

    monkeypatch.setattr(harp, "fit_harp", no_refit)
    gptq = parse_recipe({"stages": [{**fit, "reuse": str(tmp_path / "rtn")},
                                    {"method": "gptq", "bits": 3, "group_size": 32}]})
    result = llmpress.compress(folder, gptq, out=tmp_path / "gptq", nsamples=4, seqlen=32, progress=False)
    assert torch.equal(load_file(str(tmp_path / "gptq" / "llmpress-harp.safetensors"))["q"], fitted)
    assert result.summary["HARP fit"] == {"reused from": str(tmp_path / "rtn")}

    # Another width, a matrix that is not orthogonal, a missing file: one line each, no output.
    save_file({"q": torch.eye(8, dtype=torch.float64)}, str(tmp_path / "narrow.safetensors"))
    save_file({"q": fitted * 1.01}, str(tmp_path / "scaled.safetensors"))
    for source, message in (("narrow.safetensors", r"holds a rotation of \(8, 8\), this model needs"),
                            ("scaled.safetensors", "is not orthogonal"), ("nowhere", "does not exist")):
        bad = parse_recipe({"stages": [{**fit, "reuse": str(tmp_path / source)}, {"method": "rtn", "bits": 3}]})
        with pytest.raises(LlmpressError, match=message):
            llmpress.compress(folder, bad, out=tmp_path / "bad", nsamples=4, seqlen=32, progress=False)
        assert not (tmp_path / "bad").exists()
