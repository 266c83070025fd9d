"""Factorization compressors: the knapsack, whitening, SVD/SVD-LLM/ROCKET factors, FactorLinear,
and ROCKET end to end on a tiny model (budget, bytes on disk, reload, resume)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from llmpress.compress.factor import knapsack, rocket
from llmpress.compress.factor.lowrank import svd_factors, whitened_svd_factors
from llmpress.compress.factor.whiten import whiten, whitening_factor
from llmpress.errors import RecipeError
from llmpress.formats.factor import Factors, factor_bits
from llmpress.layers import FactorLinear


def _brute_force(costs, sizes, capacity):
    best = (np.inf, None)
    for pick in itertools.product(*(range(len(c)) for c in costs)):
        size = sum(s[j] for s, j in zip(sizes, pick))
        cost = sum(c[j] for c, j in zip(costs, pick))
        if size <= capacity and cost < best[0] - 1e-12:
            best = (cost, pick)
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    layers = int(rng.integers(2, 6))
    costs = [rng.random(int(rng.integers(1, 5))) for _ in range(layers)]
    sizes = [rng.integers(0, 20, len(c)) for c in costs]
    capacity = int(rng.integers(0, 20 * layers))
    cost, pick = _brute_force(costs, sizes, capacity)
    if pick is None:
        with pytest.raises(knapsack.InfeasibleBudget):
            knapsack.solve_mckp(costs, sizes, capacity)
        return
    got = knapsack.solve_mckp(costs, sizes, capacity)
    assert sum(s[j] for s, j in zip(sizes, got)) <= capacity
    assert sum(c[j] for c, j in zip(costs, got)) == pytest.approx(cost, abs=1e-12)


def test_discretized_allocation_respects_the_real_budget():
    rng = np.random.default_rng(0)
    costs = [rng.random(6) for _ in range(30)]
    sizes = [rng.random(6) * 1e6 for _ in range(30)]
    budget = sum(float(np.median(s)) for s in sizes)
    pick = knapsack.allocate(costs, sizes, budget, buckets=500)
    assert sum(s[j] for s, j in zip(sizes, pick)) <= budget
    # the coarse solution is within the finer one's reach: never better than the fine optimum
    fine = knapsack.allocate(costs, sizes, budget, buckets=20_000)
    assert sum(c[j] for c, j in zip(costs, fine)) <= sum(c[j] for c, j in zip(costs, pick)) + 1e-12


def _layer(seed=0, out=48, inp=40, tokens=400):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    mix = torch.randn(inp, inp, generator=g, dtype=torch.float64) * (torch.rand(inp, generator=g, dtype=torch.float64) * 3)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ mix   # correlated inputs
    return w, x


def test_whitened_error_equals_the_output_error():
    w, x = _layer()
    approx = w + 0.1 * torch.randn_like(w)
    factor, damp = whitening_factor(x.T @ x)
    assert damp == 0.0
    out_err = (x @ (w - approx).T).pow(2).sum()
    whitened = (whiten(w, factor) - whiten(approx, factor)).pow(2).sum()
    assert float(whitened) == pytest.approx(float(out_err), rel=1e-9)


def test_full_rank_factors_reconstruct_the_weight():
    w, x = _layer()
    full = min(w.shape)
    torch.testing.assert_close(svd_factors(w, full).weight(), w, rtol=0, atol=1e-10)
    torch.testing.assert_close(whitened_svd_factors(w, x.T @ x, full).weight(), w, rtol=0, atol=1e-9)
    d, c, mask, err = rocket.fit(rocket.profile_layer(w, x.T @ x), full, None)
    assert mask is None and err < 1e-7
    factor, _ = whitening_factor(x.T @ x)
    torch.testing.assert_close(Factors(rocket.unwhiten(d, factor), c).weight(), w, rtol=0, atol=1e-9)


def test_whitened_svd_beats_plain_svd_on_the_output_error():
    w, x = _layer(1)
    for rank in (5, 15, 30):
        errors = [(x @ (w - f.weight()).T).norm() for f in (svd_factors(w, rank), whitened_svd_factors(w, x.T @ x, rank))]
        assert errors[1] < errors[0]


@pytest.mark.parametrize("rank,nnz", [(30, 10), (24, 12), (36, 4)])
def test_rocket_sparse_fit_reports_its_real_error(rank, nnz):
    w, x = _layer(2)
    profile = rocket.profile_layer(w, x.T @ x)
    d, c, mask, err = rocket.fit(profile, rank, nnz)
    assert (mask.sum(dim=0) == nnz).all()              # exactly nnz atoms per output column
    assert (c[~mask] == 0).all()
    direct = (profile.xw - d @ c).norm() / profile.xw.norm()
    assert err == pytest.approx(float(direct), rel=1e-6)
    # the closed-form dictionary is least squares for the mask: no other dictionary does better
    worse = (profile.xw - (d + 1e-3 * torch.randn_like(d)) @ c).norm() / profile.xw.norm()
    assert float(worse) > err


def test_rocket_candidates_fit_their_budget():
    w, x = _layer(3, out=64, inp=48)
    for c in rocket.candidates(rocket.profile_layer(w, x.T @ x), value_bits=32):
        assert c.bits == factor_bits(48, 64, c.settings["rank"], c.settings["nnz"], 32)
        assert c.bits <= (1 - c.removed) * w.numel() * 32
        assert 0 <= c.error < 1


@pytest.mark.parametrize("values", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("sparse", [False, True])
def test_factor_linear_forward_equals_its_dense_weight(sparse, values):
    from llmpress.kernels.dispatch import use_backend

    w, x = _layer(4)
    profile = rocket.profile_layer(w, x.T @ x)
    d, c, mask, _ = rocket.fit(profile, 30, 8 if sparse else None)
    factors = Factors(rocket.unwhiten(d, profile.factor), c, mask)
    bias = torch.randn(w.shape[0])
    layer = FactorLinear.from_factors(factors, bias, torch.float32, values)
    assert layer.dictionary.dtype == values and layer.bias.dtype == torch.float32
    # the stored values are the factors rounded once to their dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[values]
    torch.testing.assert_close(layer.dequantize().double(), factors.weight(), rtol=0,
                               atol=tol * float(factors.weight().abs().max()))
    dense = layer.dequantize()   # fp32 products of the stored values
    # decoding rows (one: the C++ GEMVs; a few: the stored dtype) and a prefill-sized input
    for shape in ((1, 1, w.shape[1]), (1, 3, w.shape[1]), (3, 7, w.shape[1])):
        inputs = torch.randn(*shape)
        expected = inputs @ dense.T + bias
        with use_backend("reference"):
            torch.testing.assert_close(layer(inputs), expected, rtol=1e-5, atol=1e-5)
        # a few rows multiplied in the stored dtype carry its rounding of the inputs
        close = 1e-5 if values == torch.float32 or shape[1] != 3 else 4 * tol
        torch.testing.assert_close(layer(inputs), expected, rtol=close, atol=close * float(expected.abs().max()))
    assert layer.stored_bits() == factor_bits(w.shape[1], w.shape[0], 30, 8 if sparse else None,
                                              torch.finfo(values).bits)
    if sparse:
        assert layer.coef_index.dtype == torch.int16 and layer.coef_values.shape == (w.shape[0], 8)


def test_half_and_ell_gemvs_equal_fp32_products():
    from llmpress.kernels import cpu_ext

    ext = cpu_ext.extension()
    if ext is None:
        pytest.skip("no C++ compiler: the torch paths serve")
    g = torch.Generator().manual_seed(0)
    for k, n in ((193, 77), (576, 64), (8, 5)):      # tails of the 16-, 8- and 4-row loops
        w = torch.randn(n, k, generator=g)
        for dtype in (torch.float16, torch.bfloat16):
            stored = w.to(dtype)
            for rows in (1, 3):
                x = torch.randn(rows, k, generator=g)
                expected = x.double() @ stored.double().T
                torch.testing.assert_close(ext.half_gemv(x, stored).double(), expected, rtol=1e-5,
                                           atol=1e-5 * float(expected.abs().max()))
    rank, n, nnz = 37, 50, 11
    index = torch.rand(n, rank, generator=g).argsort(dim=1)[:, :nnz].sort(dim=1).values
    for values_dtype in (torch.float32, torch.float16, torch.bfloat16):
        values = torch.randn(n, nnz, generator=g).to(values_dtype)
        dense = torch.zeros(n, rank, dtype=torch.float64).scatter_(1, index, values.double())
        for index_dtype in (torch.int16, torch.int32):
            h = torch.randn(3, rank, generator=g)
            torch.testing.assert_close(ext.ell_gemv(h, values, index.to(index_dtype)).double(), h.double() @ dense.T,
                                       rtol=1e-5, atol=1e-5)


def _decoder_linear_bytes(folder, names):
    total = 0
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            for key in list(f.keys()):
                if any(key.startswith(n + ".") for n in names) and not key.endswith(".bias"):
                    t = f.get_tensor(key)
                    total += t.numel() * t.element_size()
    return total


def test_rocket_end_to_end_budget_bytes_reload_and_resume(tiny_model_factory, tmp_path):
    import llmpress

    folder = tiny_model_factory("llama")
    dense, _ = llmpress.load(folder)
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    dense_bytes = sum(dense.get_submodule(n).weight.numel() * 4 for n in linears)
    out = tmp_path / "rocket"
    res = llmpress.compress(folder, "rocket-30", out=out, nsamples=8, seqlen=64, progress=False, keep_model=True)
    alloc = res.summary["allocation"]
    assert alloc["removed (stored bits)"] >= 0.30
    assert _decoder_linear_bytes(out, linears) <= 0.70 * dense_bytes
    assert (out / "llmpress-allocation.png").exists()
    loaded, _ = llmpress.load(out)
    ids = torch.randint(0, 1000, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)
    assert any(isinstance(m, FactorLinear) and m.nnz is not None for m in loaded.modules()) or \
        alloc["layers"].get("sparse coefficients", 0) == 0
    # values stored in fp16 (the stage's default), linears kept dense at the source's fp32: the plan
    # counted each at its own width
    modules = [loaded.get_submodule(n) for n in linears]
    assert all(m.dictionary.dtype == torch.float16 for m in modules if isinstance(m, FactorLinear))
    stored = sum(m.stored_bits() if isinstance(m, FactorLinear) else m.weight.numel() * 32 for m in modules)
    assert alloc["bits per weight"] == pytest.approx(stored / sum(m.in_features * m.out_features for m in modules),
                                                     rel=1e-3)
    factored = [m for m in modules if isinstance(m, FactorLinear)]   # the report sizes them from the manifest
    assert res.summary["bits per weight (codes+scales+zeros)"] == pytest.approx(
        sum(m.stored_bits() for m in factored) / sum(m.in_features * m.out_features for m in factored), rel=1e-3)
    # the dense export loads in stock transformers and computes the same function
    from transformers import AutoModelForCausalLM

    from llmpress.io.export import export

    exported = export(out, tmp_path / "dense", "dense", dtype="float32")
    stock = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, res.model(ids).logits, rtol=1e-4, atol=1e-4)
    # --resume reuses the saved plan: same modules, same tensors
    plan = json.loads((out / "llmpress-allocation.json").read_text())
    again = llmpress.compress(folder, "rocket-30", out=out, nsamples=8, seqlen=64, progress=False, resume=True)
    assert again.summary["allocation"] == plan["summary"]
    reloaded, _ = llmpress.load(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("recipe", ["svd-30", "svdllm-30"])
def test_uniform_low_rank_presets_remove_their_share(tiny_model_factory, tmp_path, recipe):
    import llmpress

    folder = tiny_model_factory("llama")
    dense, _ = llmpress.load(folder)
    linears = [n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    dense_bytes = sum(dense.get_submodule(n).weight.numel() * 4 for n in linears)
    out = tmp_path / recipe
    res = llmpress.compress(folder, recipe, out=out, nsamples=8, seqlen=64, progress=False, keep_model=True)
    assert _decoder_linear_bytes(out, linears) <= 0.70 * dense_bytes
    loaded, _ = llmpress.load(out)
    ids = torch.randint(0, 1000, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)


def test_recipe_errors_are_clear():
    from llmpress.compress.recipe import parse_recipe

    with pytest.raises(RecipeError, match="ratio"):
        parse_recipe({"stages": [{"method": "svd", "ratio": 1.5}]})
    with pytest.raises(RecipeError, match="rotation stage must come first"):
        parse_recipe({"stages": [{"method": "rocket", "target": 0.3}, {"method": "rht"}]})
    with pytest.raises(RecipeError, match="kappas"):
        parse_recipe({"stages": [{"method": "rocket", "target": 0.3, "kappas": [0.5]}]})


def test_a_tampered_atom_index_is_refused(tiny_model_factory, tmp_path):
    from safetensors.torch import load_file, save_file

    import llmpress
    from llmpress.compress.recipe import load_recipe
    from llmpress.errors import ModelLoadError

    # fp32 values: an int16 index then costs half a value and the budget takes sparse coefficients
    # (at fp16 it costs a whole one, and on this tiny model the knapsack takes none)
    recipe = load_recipe("rocket-50")
    recipe.stages[0].values = "float32"
    out = tmp_path / "rocket"
    llmpress.compress(tiny_model_factory("llama"), recipe, out=out, nsamples=8, seqlen=64, progress=False)
    for shard in sorted(out.glob("*.safetensors")):
        tensors = load_file(str(shard))
        keys = [k for k in tensors if k.endswith("coef_index")]
        if keys:
            tensors[keys[0]][0, 0] = 32000
            save_file(tensors, str(shard), metadata={"format": "pt"})
            break
    else:
        raise AssertionError("the allocation chose no sparse coefficients: nothing to tamper with")
    with pytest.raises(ModelLoadError, match="coef_index"):
        llmpress.load(out)


def test_a_second_budget_reuses_the_cached_profile(tiny_model_factory, tmp_path, monkeypatch):
    import llmpress
    from llmpress.compress import allocation

    folder = tiny_model_factory("qwen2")
    first = llmpress.compress(folder, "rocket-20", out=tmp_path / "a", nsamples=8, seqlen=64, progress=False)

    def no_profiling(*args, **kwargs):
        raise AssertionError("profiled again")

    monkeypatch.setattr(allocation, "profile_blocks", no_profiling)
    second = llmpress.compress(folder, "rocket-50", out=tmp_path / "b", nsamples=8, seqlen=64, progress=False)
    assert second.summary["allocation"]["removed (stored bits)"] >= 0.5
    assert first.summary["allocation"]["removed (stored bits)"] >= 0.2
    with pytest.raises(AssertionError, match="profiled again"):   # other calibration: a new profile
        llmpress.compress(folder, "rocket-50", out=tmp_path / "c", nsamples=8, seqlen=64, seed=1, progress=False)


@pytest.mark.parametrize("rotated", [False, True])
def test_the_profiling_pass_streams_blocks_and_scores_what_the_whole_model_would(tiny_model_factory, rotated):
    """An allocator's profile reads one block at a time (rotated as the run will compress it) and
    sees the same weights and Hessians as a pass over the whole model, rotated in memory."""
    from llmpress.compress.allocation import profile_blocks
    from llmpress.compress.recipe import parse_recipe
    from llmpress.compress.run import _load_linear, _prepare, _rotate_in_memory, _StreamedWeights

    folder = tiny_model_factory("llama")
    stages = [{"method": "rht", "seed": 0}] if rotated else []
    recipe = parse_recipe({"stages": [*stages, {"method": "gptq", "bits": 4, "group_size": 32}]})
    job = _prepare(folder, recipe, "unused", None, 4, 32, 0, [], False)

    def score(name, weight, hessian):
        return weight.clone(), hessian.clone()

    streamed = _StreamedWeights(job, job.rotation)
    arch = job.rotation.compress_arch() if rotated else streamed.arch
    got = profile_blocks(streamed.model, arch, job.windows, lambda n: True, score, progress=False, weights=streamed)
    assert all(p.device.type == "meta" for p in streamed.model.model.layers.parameters())
    whole = _load_linear(folder, False)
    _rotate_in_memory(whole, job.rotation, streamed.arch, job.rest_names)
    want = profile_blocks(whole, arch, job.windows, lambda n: True, score, progress=False)
    assert list(got) == list(want) and len(got) == 7 * len(whole.model.layers)
    for name in want:
        assert torch.equal(got[name][0], want[name][0]) and torch.equal(got[name][1], want[name][1])
