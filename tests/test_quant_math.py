"""The pure mathematics: grid, packing, RTN and GPTQ on random matrices."""

from __future__ import annotations

import sys

import pytest
import torch

from llmpress.compress.quant.gptq import gptq_quantize
from llmpress.compress.quant.grid import fit_grid
from llmpress.compress.quant.hessian import HessianError, _inverse_factor, damped_inverse_cholesky, reverse_inplace
from llmpress.compress.quant.rtn import rtn_quantize
from llmpress.formats.packing import pack_codes, packed_words, unpack_codes
from llmpress.formats.uniform import group_count
from llmpress.layers import QuantLinear


def _correlated(n_in=512, tokens=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in**0.5
    return torch.randn(tokens, n_in, generator=g) @ mix + 0.1 * torch.randn(tokens, n_in, generator=g)


def _out_err(w_hat, w, x):
    return float(((w_hat - w) @ x.T).pow(2).sum())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("count", [1, 7, 31, 32, 33, 96, 577])
def test_pack_unpack_exact(bits, count):
    codes = torch.randint(0, 1 << bits, (3, count), generator=torch.Generator().manual_seed(count))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, packed_words(count, bits))
    assert torch.equal(unpack_codes(packed, bits, count), codes)


def test_pack_uses_every_bit_and_rejects_out_of_range():
    assert packed_words(32, 3) == 3 and packed_words(64, 2) == 4 and packed_words(5, 8) == 2
    with pytest.raises(ValueError):
        pack_codes(torch.tensor([[8]]), 3)


@pytest.mark.parametrize("sym", [False, True])
def test_grid_contains_zero_and_dequantizes_within_half_step(sym):
    w = torch.randn(16, 64) + 0.5
    params = fit_grid(w, 4, sym)
    from llmpress.compress.quant.grid import fake_quantize

    assert (fake_quantize(torch.zeros(16, 1), params, 4) == 0).all()   # zero is exactly representable
    err = (fake_quantize(w, params, 4) - w).abs()
    # half a step, plus what rounding the scale to fp16 can add at the range's edge (7.5 steps)
    assert (err <= params.scale.unsqueeze(1) * (0.5 + 8 * 2**-11)).all()
    assert torch.equal(params.scale, params.scale.half().float())        # stored as fp16 without loss


@pytest.mark.parametrize("bits,group", [(4, -1), (3, 64), (2, 64), (4, 128)])
def test_gptq_beats_rtn_on_correlated_inputs(bits, group):
    x = _correlated()
    w = torch.randn(256, 512, generator=torch.Generator().manual_seed(1))
    h = 2 * x.T @ x / x.shape[0]
    gptq = gptq_quantize(w, h, bits=bits, group_size=group, act_order=False)
    rtn = rtn_quantize(w, bits=bits, group_size=group)
    assert _out_err(gptq.dequantize(), w, x) < 0.8 * _out_err(rtn.dequantize(), w, x)


def test_gptq_act_order_and_static_groups_improve_or_match_and_store_g_idx():
    x = _correlated() * torch.linspace(0.1, 3, 512)   # channels of very different energy
    w = torch.randn(128, 512)
    h = 2 * x.T @ x / x.shape[0]
    plain = gptq_quantize(w, h, bits=3, group_size=64)
    ordered = gptq_quantize(w, h, bits=3, group_size=64, act_order=True)
    static = gptq_quantize(w, h, bits=3, group_size=64, act_order=True, static_groups=True)
    assert ordered.g_idx is not None and static.g_idx is None
    # every group of act-order holds exactly group_size columns (the last may be ragged)
    assert torch.bincount(ordered.g_idx.long()).tolist() == [64] * 8
    assert _out_err(ordered.dequantize(), w, x) < _out_err(plain.dequantize(), w, x)
    assert _out_err(static.dequantize(), w, x) < 1.1 * _out_err(plain.dequantize(), w, x)


def test_gptq_with_diagonal_hessian_is_rtn_in_any_order():
    w = torch.randn(64, 256)
    h = torch.diag(torch.rand(256) + 0.5)
    for act_order in (False, True):
        assert torch.equal(gptq_quantize(w, h, bits=4, act_order=act_order).codes, rtn_quantize(w, bits=4).codes)
    assert torch.equal(gptq_quantize(w, h, bits=3, group_size=64).codes, rtn_quantize(w, bits=3, group_size=64).codes)


def test_gptq_per_row_is_invariant_to_block_size():
    x = _correlated(n_in=256, tokens=2048)
    w = torch.randn(64, 256)
    h = 2 * x.T @ x / x.shape[0]
    a = gptq_quantize(w, h, bits=3, block_size=128).dequantize()
    b = gptq_quantize(w, h, bits=3, block_size=32).dequantize()
    assert (a - b).abs().max() < 1e-3 * w.abs().max() or (a != b).float().mean() < 0.01


def test_gptq_act_order_is_a_no_op_when_the_diagonal_is_already_sorted():
    x = _correlated(n_in=128, tokens=2048) * torch.linspace(3, 0.5, 128)
    x = x[:, torch.argsort(x.pow(2).sum(0), descending=True)]   # columns by falling energy
    h = 2 * x.T @ x / x.shape[0]
    assert (torch.diagonal(h)[:-1] > torch.diagonal(h)[1:]).all()
    w = torch.randn(32, 128)
    assert torch.equal(gptq_quantize(w, h, bits=4).codes, gptq_quantize(w, h, bits=4, act_order=True).codes)


def test_singular_hessian_and_dead_inputs_do_not_crash():
    x = torch.randn(8, 128)                  # rank 8 of 128: singular
    x[:, 5] = 0                               # a dead input channel
    h = 2 * x.T @ x / 8
    w = torch.randn(32, 128)
    q = gptq_quantize(w, h, bits=4, group_size=32)
    assert q.metrics["dead_inputs"] == 1
    assert torch.isfinite(q.dequantize()).all()
    # the dead column keeps its weights on the grid instead of being zeroed
    assert (q.dequantize()[:, 5] - w[:, 5]).abs().max() < q.scales.max()
    with pytest.raises(HessianError):
        gptq_quantize(w, torch.full((128, 128), float("nan")), bits=4)


def test_ragged_last_group():
    w = torch.randn(16, 100)
    assert group_count(100, 64) == 2
    q = rtn_quantize(w, bits=4, group_size=64)
    assert q.scales.shape == (16, 2)
    h = torch.eye(100)
    g = gptq_quantize(w, h, bits=4, group_size=64, act_order=True)
    assert sorted(torch.bincount(g.g_idx.long()).tolist()) == [36, 64]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("act_order", [False, True])
def test_packed_layer_equals_its_dequantized_weights(bits, act_order):
    x = _correlated(n_in=96, tokens=512)
    w = torch.randn(40, 96)
    bias = torch.randn(40)
    q = gptq_quantize(w, 2 * x.T @ x, bits=bits, group_size=32, act_order=act_order)
    layer = QuantLinear.from_quantized(q, bias, torch.float32)
    inp = torch.randn(5, 96)
    expected = inp @ q.dequantize().T + bias
    assert torch.allclose(layer(inp), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.dequantize(), q.dequantize())


def test_damping_rises_until_the_cholesky_succeeds():
    h = torch.eye(64)
    h[0, 1] = h[1, 0] = 1.03          # eigenvalue -0.03: damping 0.01 and 0.02 are not enough
    w = torch.randn(8, 64)
    q = gptq_quantize(w, h, bits=4, damp=0.01)
    assert 0.03 < q.metrics["damp"] <= 0.05
    assert torch.isfinite(q.dequantize()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [1, 7, 64, 577])
def test_inplace_inverse_factor_is_the_upper_cholesky_of_the_damped_inverse(dtype, n, monkeypatch):
    """The CPU path of large layers (LAPACK in place) gives U upper with UᵀU = (H + λI)⁻¹, equal to
    the torch path's factor, and leaves H untouched."""
    monkeypatch.setattr(sys.modules[damped_inverse_cholesky.__module__], "IN_PLACE_FROM", 0)
    x = _correlated(n_in=n, tokens=2 * n + 8).to(dtype)
    h = x.T @ x
    before = h.clone()
    upper, used = damped_inverse_cholesky(h, 0.01)
    assert torch.equal(h, before) and used == 0.01
    assert torch.equal(upper, torch.triu(upper))
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(n, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    assert torch.allclose(upper.T @ upper @ damped, torch.eye(n, dtype=dtype), atol=tol)
    reference, _ = _inverse_factor(h, 0.01 * float(h.diagonal().mean()), None)
    assert torch.allclose(upper, reference, rtol=tol, atol=tol * float(reference.abs().max()))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 100, 577])
def test_blocked_triangular_inverse_equals_the_triangular_solve(n):
    from llmpress.compress.quant.hessian import lower_triangular_inverse

    x = _correlated(n_in=n, tokens=2 * n + 8).double()
    lower = torch.linalg.cholesky(x.T @ x + torch.eye(n, dtype=torch.float64))
    got = lower_triangular_inverse(lower, base=16)   # several levels of halves, odd sizes included
    want = torch.linalg.solve_triangular(lower, torch.eye(n, dtype=torch.float64), upper=False)
    assert torch.equal(got, torch.tril(got))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


@pytest.mark.parametrize("shape", [(1, 1), (2, 2), (3, 3), (5, 5), (9, 4)])
def test_reverse_inplace_is_flip_of_both_axes(shape):
    m = torch.randn(*shape)
    expected = m.flip(0, 1)
    assert torch.equal(reverse_inplace(m, chunk=2), expected)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_hessian_is_refused(bad):
    h = torch.eye(16)
    h[3, 5] = bad
    with pytest.raises(HessianError, match="NaN or Inf"):
        damped_inverse_cholesky(h, 0.01)


def test_mse_range_search_lowers_the_grid_error():
    from llmpress.compress.quant.grid import fake_quantize

    w = torch.randn(64, 256)
    w[:, 0] = 12.0                     # one outlier per row stretches the min-max range
    plain, searched = fit_grid(w, 3, sym=False), fit_grid(w, 3, sym=False, mse=True)
    err = lambda p: (fake_quantize(w, p, 3) - w).abs().pow(2.4).sum()
    assert err(searched) < 0.9 * err(plain)
    assert (searched.scale <= plain.scale + 1e-6).all()   # the search only ever shrinks the range


@pytest.mark.parametrize("kw", [
    dict(bits=3, group_size=64), dict(bits=3, group_size=64, act_order=True),
    dict(bits=3, group_size=64, act_order=True, static_groups=True), dict(bits=4, group_size=-1, act_order=True),
    dict(bits=2, group_size=48, act_order=True),
])
def test_packed_error_equals_the_solver_accounted_loss(kw):
    """OBS bookkeeping: Σ e_j² / 2 over the processed columns equals ½·tr(ΔW H_λ ΔWᵀ) of the
    packed, dequantized weights. Any mismatch between the codes, scales, zeros and g_idx the
    layer stores and what the solver compensated for breaks it."""
    g = torch.Generator().manual_seed(1)
    rows, cols, tokens = 96, 320, 4000
    X = torch.randn(tokens, cols, generator=g) @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    X[:, :7] *= 5
    W = torch.randn(rows, cols, generator=g)
    H = 2 * X.T @ X / tokens
    result = gptq_quantize(W, H, **kw)
    delta = (QuantLinear.from_quantized(result, None, torch.float32).dequantize(torch.float32) - W).double()
    H_damped = H.double() + result.metrics["damp"] * torch.diagonal(H.double()).mean() * torch.eye(cols, dtype=torch.float64)
    accounted = result.metrics["gptq_loss"]
    assert abs(float(((delta @ H_damped) * delta).sum()) / 2 - accounted) <= 1e-5 * accounted


def _textbook_gptq(W, H, bits, group, act_order, block=128, damp=0.01):
    """GPTQ written out as research/algos-quant.md §1.3 states the reference's loop: explicit
    inverse and a second Cholesky, columns of W (not transposed), min-max grid containing zero,
    group parameters from the outer (lazily updated) W; with our two documented departures (scales
    rounded to fp16 as stored, dead input columns kept instead of zeroed)."""
    W, H = W.clone(), H.clone()
    maxq = 2 ** bits - 1
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diagonal(H), descending=True) if act_order else torch.arange(W.shape[1])
    W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.diagonal(H).mean() * torch.eye(H.shape[0])
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)

    def grid(x):
        lo, hi = x.min(1).values.clamp(max=0), x.max(1).values.clamp(min=0)
        scale = ((hi - lo) / maxq).half().float()
        return scale, torch.round(-lo / scale)

    scale, zero = grid(W)
    Q = torch.zeros_like(W)
    for i1 in range(0, W.shape[1], block):
        i2 = min(i1 + block, W.shape[1])
        W1, E = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1)
        for i in range(i2 - i1):
            if group > 0 and (i1 + i) % group == 0:
                scale, zero = grid(W[:, i1 + i:i1 + i + group])
            w = W1[:, i]
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            Q[:, i1 + i] = q
            E[:, i] = (w - q) / U[i1 + i, i1 + i]
            W1[:, i:] -= E[:, i:i + 1] * U[i1 + i, i1 + i:i2]
        W[:, i2:] -= E @ U[i1:i2, i2:]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize(("group", "act_order"), [(64, False), (64, True), (-1, True), (48, True), (32, False)])
def test_gptq_equals_the_textbook_loop(group, act_order):
    """The same weights as the reference's loop written out plainly: our fused inverse factor and
    transposed columns change nothing but float rounding, and no code flips. Groups of 48 and 32
    start inside lazy blocks, where the group parameters come from the not yet updated weights."""
    x = _correlated(384, 3000, seed=4)
    x[:, 5] = 0                                        # a dead input
    x[:, 11] *= 8
    w = torch.randn(160, 384, generator=torch.Generator().manual_seed(9))
    h = 2 * x.T @ x / x.shape[0]
    ours = QuantLinear.from_quantized(gptq_quantize(w, h, bits=3, group_size=group, act_order=act_order),
                                      None, torch.float32).dequantize(torch.float32)
    assert torch.allclose(ours, _textbook_gptq(w, h, 3, group, act_order), rtol=0, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_whole_byte_packing_equals_the_general_bitstream(bits, monkeypatch):
    from llmpress.formats import packing

    codes = torch.randint(0, 1 << bits, (2, 5, 96), generator=torch.Generator().manual_seed(bits))
    fast = pack_codes(codes, bits)
    monkeypatch.setattr(packing.sys, "byteorder", "big")   # forces the general path
    general = pack_codes(codes, bits)
    assert torch.equal(fast, general)
    assert torch.equal(unpack_codes(general, bits, 96), codes)
    monkeypatch.undo()
    assert torch.equal(unpack_codes(general, bits, 96), codes)
