"""Tensor-train matrices: exact at full rank, the contraction forward, parameter counts, the
activation-aware variant, TTLinear save/reload, and the family-mixing allocator end to end."""

from __future__ import annotations

import math

import pytest
import torch

from llmpress.compress.factor import tt
from llmpress.formats.tt import contraction_macs, reconstruction_macs, tt_forward, tt_full
from llmpress.layers import TTLinear


@pytest.mark.parametrize("shape,order", [((160, 64), 3), ((64, 160), 2), ((97, 61), 2), ((96, 72), 4)])
def test_full_rank_tt_reconstructs_the_weight(shape, order):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.float64)
    out_modes, in_modes = tt.balanced_modes(shape[0], order), tt.balanced_modes(shape[1], order)
    cores = tt.tt_svd(w, out_modes, in_modes, rank=10 ** 6)
    assert len(cores) == order
    torch.testing.assert_close(tt_full(cores, shape), w, rtol=0, atol=1e-10)
    x = torch.randn(3, 5, shape[1], dtype=torch.float64)
    torch.testing.assert_close(tt_forward(x, cores, shape[0]), x @ w.T, rtol=0, atol=1e-10)


def test_truncated_forward_equals_the_reconstruction():
    torch.manual_seed(1)
    w = torch.randn(160, 64, dtype=torch.float64)
    cores = tt.tt_svd(w, (8, 5, 4), (4, 4, 4), rank=7)
    x = torch.randn(11, 64, dtype=torch.float64)
    torch.testing.assert_close(tt_forward(x, cores, 160), x @ tt_full(cores, (160, 64)).T, rtol=0, atol=1e-10)


@pytest.mark.parametrize("n,d", [(576, 3), (1536, 3), (192, 3), (4864, 3), (97, 2), (64, 4)])
def test_balanced_modes_cover_the_dimension(n, d):
    modes = tt.balanced_modes(n, d)
    assert len(modes) == d and math.prod(modes) >= n and math.prod(modes) <= n * 1.125 + 1
    assert max(modes) / min(modes) <= 3


@pytest.mark.parametrize("removed", [0.1, 0.3, 0.6])
def test_cores_hold_the_parameters_the_rank_choice_promised(removed):
    out_modes, in_modes, rank = tt.tt_plan(1536, 576, removed, 3)
    cores = tt.tt_svd(torch.randn(1536, 576, dtype=torch.float64), out_modes, in_modes, rank)
    promised = tt.tt_params(out_modes, in_modes, tt.tt_ranks(out_modes, in_modes, rank))
    assert sum(c.numel() for c in cores) == promised <= (1 - removed) * 1536 * 576
    # the largest such rank: one more would break the budget
    assert tt.tt_params(out_modes, in_modes, tt.tt_ranks(out_modes, in_modes, rank + 1)) > (1 - removed) * 1536 * 576


def test_kronecker_factors_recover_a_kronecker_gram():
    g = torch.Generator().manual_seed(2)
    parts = [torch.randn(n, n, generator=g, dtype=torch.float64) for n in (4, 3, 5)]
    parts = [p @ p.T + torch.eye(p.shape[0], dtype=torch.float64) for p in parts]
    gram = torch.kron(torch.kron(parts[0], parts[1]), parts[2])
    factors = tt.kronecker_factors(gram, (4, 3, 5))
    torch.testing.assert_close(torch.kron(torch.kron(factors[0], factors[1]), factors[2]), gram, rtol=1e-9, atol=1e-9)


def test_aware_tt_beats_data_free_tt_on_a_kronecker_structured_input():
    g = torch.Generator().manual_seed(3)
    mixes = [torch.randn(4, 4, generator=g, dtype=torch.float64) * torch.tensor([8.0, 1, 0.3, 0.1], dtype=torch.float64)
             for _ in range(3)]
    x = torch.randn(3000, 64, generator=g, dtype=torch.float64) @ torch.kron(torch.kron(mixes[0], mixes[1]), mixes[2])
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    hessian = x.T @ x
    out_modes, in_modes = tt.balanced_modes(96, 3), tt.balanced_modes(64, 3)
    for rank in (3, 6, 12):
        free = tt_full(tt.tt_svd(w, out_modes, in_modes, rank), (96, 64))
        aware = tt_full(tt.aware_tt_svd(w, hessian, out_modes, in_modes, rank), (96, 64))
        assert tt.relative_output_error(aware - w, w, hessian) < tt.relative_output_error(free - w, w, hessian)


def test_guarded_aware_tt_keeps_the_whitened_cores_only_where_they_lower_the_layer_error():
    """Inputs with two massive channels (a Gram far from a Kronecker product): the guarded variant
    returns whichever of the whitened and plain TT-SVDs has the lower exact output error, and says
    which; in this set both choices occur."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 64, generator=g, dtype=torch.float64)
    picks = set()
    for trial in range(3):
        x = torch.randn(400, 64, generator=g, dtype=torch.float64)
        x[:, trial * 7 % 64] *= 60
        x[:, (trial * 13 + 5) % 64] *= 30
        hessian = x.T @ x
        out_modes, in_modes, rank = tt.tt_plan(96, 64, 0.2, 3)
        errors = {}
        for name, cores in (("whitened", tt.aware_tt_svd(w, hessian, out_modes, in_modes, rank)),
                            ("plain", tt.tt_svd(w, out_modes, in_modes, rank))):
            errors[name] = tt.relative_output_error(tt_full(cores, (96, 64)) - w, w, hessian)
        cores, metrics = tt.tt_factorize(w, 0.2, 3, hessian)
        got = tt.relative_output_error(tt_full(cores, (96, 64)) - w, w, hessian)
        assert got == pytest.approx(min(errors.values()), rel=1e-12)
        assert metrics["rel_output_error"] == pytest.approx(got, rel=1e-12)
        assert metrics["tt_whitened"] == float(errors["whitened"] < errors["plain"])
        picks.add(metrics["tt_whitened"])
    assert picks == {0.0, 1.0}


def _objective(cores, w, hessian):
    delta = tt_full(cores, tuple(w.shape)) - w
    return ((delta @ hessian) * delta).sum()


@pytest.mark.parametrize("first", [False, True])
def test_edge_core_refit_is_the_exact_least_squares_solution(first):
    """At the refitted core, the gradient of ‖X ΔWᵀ‖² over that core vanishes (30 output rows padded
    to 32: the padded rows are not in the objective; 45 inputs need no padding)."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(30, 45, generator=g, dtype=torch.float64)
    x = torch.randn(300, 45, generator=g, dtype=torch.float64) @ torch.randn(45, 45, generator=g, dtype=torch.float64)
    hessian = x.T @ x
    out_modes, in_modes = tt.balanced_modes(30, 3), tt.balanced_modes(45, 3)
    assert math.prod(out_modes) > 30 and math.prod(in_modes) == 45
    cores = tt.tt_svd(w, out_modes, in_modes, 3)
    k = 0 if first else -1

    def gradient(cs):
        cs = [c.contiguous().clone().requires_grad_(i == k % len(cs)) for i, c in enumerate(cs)]
        _objective(cs, w, hessian).backward()
        return cs[k].grad

    if first:   # a sweep refits the last core, then the first
        refit = tt.refit_edge_cores(cores, w, hessian, sweeps=1)
    else:
        refit = [*cores[:-1], tt.refit_last_core(cores, *_padded(w, hessian, out_modes, in_modes))]
    assert gradient(refit).abs().max() <= 1e-9 * gradient(cores).abs().max()
    assert _objective(refit, w, hessian) < _objective(cores, w, hessian)


def _padded(w, hessian, out_modes, in_modes):
    rows, cols = math.prod(out_modes), math.prod(in_modes)
    padded = torch.zeros(rows, cols, dtype=torch.float64)
    padded[: w.shape[0], : w.shape[1]] = w
    return padded, tt.padded_gram(hessian, cols), torch.arange(rows) < w.shape[0]


def test_refit_lowers_the_guarded_error_and_stays_exact_at_full_rank():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 61, generator=g, dtype=torch.float64)
    x = torch.randn(400, 61, generator=g, dtype=torch.float64)
    x[:, 3] *= 40
    hessian = x.T @ x
    _, guarded = tt.tt_factorize(w, 0.3, 3, hessian)
    cores, metrics = tt.tt_factorize(w, 0.3, 3, hessian, refit_sweeps=2)
    assert metrics["rel_output_error_svd"] == guarded["rel_output_error"]
    assert metrics["rel_output_error"] < 0.95 * guarded["rel_output_error"]
    got = tt.relative_output_error(tt_full(cores, (96, 61)) - w, w, hessian)
    assert got == pytest.approx(metrics["rel_output_error"], rel=1e-12)
    full = tt.tt_svd(w, tt.balanced_modes(96, 3), tt.balanced_modes(61, 3), 10 ** 6)
    assert (tt_full(tt.refit_edge_cores(full, w, hessian), (96, 61)) - w).abs().max() < 1e-9


def test_tt_linear_forward_and_bits():
    torch.manual_seed(4)
    w = torch.randn(97, 61, dtype=torch.float64)
    cores = tt.tt_svd(w, tt.balanced_modes(97, 2), tt.balanced_modes(61, 2), rank=5)
    bias = torch.randn(97)
    layer = TTLinear.from_cores(cores, (97, 61), bias, torch.float32)
    x = torch.randn(2, 9, 61)
    torch.testing.assert_close(layer(x), x @ layer.dequantize().T + bias, rtol=1e-5, atol=1e-5)
    assert layer.stored_bits() == sum(c.numel() for c in cores) * 32
    rebuilt = TTLinear.from_format_params(layer.format_params(), torch.float32)
    assert [c.shape for c in rebuilt.cores] == [c.shape for c in layer.cores]
    with pytest.raises(ValueError, match="do not"):
        TTLinear(61, 97, out_modes=[2, 2], in_modes=[8, 8], ranks=[1, 5, 1], bias=False)


def test_tt_linear_takes_the_cheaper_path_and_both_are_the_same_function():
    # cores [1, 4, 3, 6], [6, 5, 7, 1]: contracting a row costs 1·1·3·7·4·6 + 4·6·7·1·5·1 = 504 + 840,
    # forming the weight 4·3·6 · 5·7·1 = 2520, a dense row 20·21 = 420.
    shapes = [(1, 4, 3, 6), (6, 5, 7, 1)]
    assert contraction_macs(shapes) == 1344 and reconstruction_macs(shapes) == 2520
    torch.manual_seed(5)
    w = torch.randn(20, 21, dtype=torch.float64)
    cores = tt.tt_svd(w, [4, 5], [3, 7], rank=6)
    layer = TTLinear.from_cores(cores, (20, 21), None, torch.float64)
    # rows·1344 <= 2520 + rows·420 up to 2 rows
    assert layer.contracts(1) and layer.contracts(2) and not layer.contracts(3)
    for rows in (1, 64):
        x = torch.randn(rows, 21, dtype=torch.float64)
        torch.testing.assert_close(layer(x), x @ tt_full(cores, (20, 21)).T, rtol=0, atol=1e-12)


@pytest.mark.parametrize("recipe", ["tt-30", "tt-aware-20", "tt-mixed-30"])
def test_tt_recipes_save_reload_and_keep_their_budget(tiny_model_factory, tmp_path, recipe):
    import llmpress
    from llmpress.layers import LAYER_FORMATS

    folder = tiny_model_factory("llama")
    out = tmp_path / recipe
    res = llmpress.compress(folder, recipe, out=out, nsamples=8, seqlen=64, progress=False, keep_model=True)
    loaded, _ = llmpress.load(out)
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)
    kinds = (torch.nn.Linear, *LAYER_FORMATS.values())
    linears = {n: m for n, m in loaded.named_modules() if isinstance(m, kinds) and ".layers." in n}
    stored = sum(m.weight.numel() * 32 if isinstance(m, torch.nn.Linear) else m.stored_bits() for m in linears.values())
    assert stored <= (1 - float(recipe.split("-")[-1]) / 100) * sum(m.in_features * m.out_features * 32 for m in linears.values())
    if recipe == "tt-mixed-30":
        assert res.summary["allocation"]["removed (stored bits)"] >= 0.3
    else:
        assert all(isinstance(m, TTLinear) for m in linears.values())
