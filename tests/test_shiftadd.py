"""ShiftAdd: binary coding with power-of-two scales, its GPTQ solve, the packed layer and the
lookup-table GEMV."""

from __future__ import annotations

import itertools

import pytest
import torch

from llmpress.compress.quant import bcq
from llmpress.formats.packing import pack_codes, unpack_codes
from llmpress.kernels.lut import lut_gemv
from llmpress.layers import BCQLinear


def _problem(seed=0, out=64, inp=96):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(1500, inp, generator=g) @ (torch.randn(inp, inp, generator=g) * torch.rand(inp, generator=g))
    return w, x.T @ x / x.shape[0]


def _output_error(dense, w, h):
    d = dense - w.double()
    return float(((d @ h.double()) * d).sum() / ((w.double() @ h.double()) * w.double()).sum())


def test_bcq_error_decreases_with_every_bit():
    w, _h = _problem()
    errors = []
    for bits in (1, 2, 3, 4):
        q = bcq.bcq_quantize(w, None, bits=bits)
        errors.append(float((bcq.bcq_dense(q.signs, q.alpha_exp, q.alpha_sign, 8) - w.double()).norm()))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors


@pytest.mark.parametrize("terms", [1, 2, 3])
def test_scales_are_exact_sums_of_powers_of_two(terms):
    q = bcq.bcq_quantize(*_problem(1), bits=3, terms=terms)
    assert q.alpha_exp.shape[-1] == terms
    alpha = bcq.apot_value(q.alpha_exp, q.alpha_sign)
    # each scale is Σ ±2^e with exactly `terms` (or fewer) terms: rebuild it from integers
    rebuilt = sum(q.alpha_sign[..., p].double() * torch.exp2(q.alpha_exp[..., p].double()) for p in range(terms))
    torch.testing.assert_close(alpha, rebuilt, rtol=0, atol=0)
    assert set(q.alpha_sign.unique().tolist()) <= {-1, 0, 1}
    assert (alpha >= 0).all()


def test_apot_rounding_is_greedy_and_converges():
    a = torch.tensor([0.37, 1.3, 0.011, 5.0])
    one, _, _ = bcq.apot_round(a, 1)
    three, _, _ = bcq.apot_round(a, 3)
    assert torch.equal(one, torch.exp2(torch.round(torch.log2(a))))
    assert ((three - a).abs() <= (one - a).abs()).all() and ((three - a).abs() / a < 0.07).all()


def test_the_gptq_solve_beats_the_weight_objective_on_the_output():
    w, h = _problem(2)
    for bits in (2, 3):
        free = bcq.bcq_quantize(w, None, bits=bits)
        solved = bcq.bcq_quantize(w, h, bits=bits)
        dense = [bcq.bcq_dense(q.signs, q.alpha_exp, q.alpha_sign, 8) for q in (free, solved)]
        assert _output_error(dense[1], w, h) < _output_error(dense[0], w, h)


def test_one_bit_planes_pack_exactly():
    signs = torch.rand(3, 5, 77) > 0.5
    packed = pack_codes(signs.to(torch.int64), 1)
    assert packed.shape == (3, 5, 3)
    assert torch.equal(unpack_codes(packed, 1, 77).bool(), signs)


@pytest.mark.parametrize("tokens", [1, 3, 8])
def test_lut_gemv_equals_the_dense_product(tokens):
    w, h = _problem(3, out=48, inp=100)     # 100 inputs: a ragged last group of 8
    layer = BCQLinear.from_bcq(bcq.bcq_quantize(w, h, bits=3), None, torch.float64)
    x = torch.randn(tokens, 100, dtype=torch.float64)
    y = lut_gemv(x, layer.sign_bits, layer.alpha_exp, layer.alpha_sign, layer.col_block, layer.out_features)
    torch.testing.assert_close(y, x @ layer.dequantize(torch.float64).T, rtol=1e-12, atol=1e-12)


def test_bcq_linear_forward_and_layout():
    w, h = _problem(4)
    q = bcq.bcq_quantize(w, h, bits=2)
    bias = torch.randn(64)
    layer = BCQLinear.from_bcq(q, bias, torch.float32)
    torch.testing.assert_close(layer.dequantize(torch.float64), bcq.bcq_dense(q.signs, q.alpha_exp, q.alpha_sign, 8))
    for tokens in (2, 40):   # the LUT path and the dequantized path
        x = torch.randn(tokens, 96)
        torch.testing.assert_close(layer(x), x @ layer.dequantize().T + bias, rtol=1e-5, atol=1e-5)
    assert layer.stored_bits() == 2 * 64 * 96 + 2 * q.alpha_exp.numel() * 8
    with pytest.raises(ValueError, match="row groups"):
        bcq.bcq_quantize(torch.randn(60, 16), None, bits=2, row_groups=8)


def test_shiftadd_preset_saves_and_reloads_exactly(tiny_model_factory, tmp_path):
    import llmpress

    res = llmpress.compress(tiny_model_factory("qwen2"), "shiftadd-w2", out=tmp_path / "s", nsamples=8, seqlen=32,
                            progress=False, keep_model=True)
    loaded, _ = llmpress.load(tmp_path / "s")
    assert sum(isinstance(m, BCQLinear) for m in loaded.modules()) == 14
    for ids in (torch.randint(0, 1000, (1, 4)), torch.randint(0, 1000, (2, 24))):   # LUT and dense paths
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, res.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bits", [2, 3])
def test_triton_lut_gemv_equals_the_torch_lut(rows, bits, device):
    triton_bcq = pytest.importorskip("llmpress.kernels.triton_bcq")
    if triton_bcq.triton is None:
        pytest.skip("triton is not installed")
    w, h = _problem(5, out=40, inp=100)   # ragged: 40 rows = 8 groups of 5; 100 inputs
    layer = BCQLinear.from_bcq(bcq.bcq_quantize(w, h, bits=bits), None, torch.float32)
    x = torch.randn(rows, 100)
    expected = lut_gemv(x.double(), layer.sign_bits, layer.alpha_exp, layer.alpha_sign, layer.col_block, 40)
    for config in ({"BLOCK_N": 16, "SPLIT_K": 1}, {"BLOCK_N": 32, "SPLIT_K": 3}):
        y = triton_bcq.bcq_gemv(layer.to(device), x.to(device), config=config)
        torch.testing.assert_close(y.double().cpu(), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at most 8 rows"):
        triton_bcq.bcq_gemv(layer, torch.randn(9, 100, device=device))


def test_mixed_bits_meet_the_average_and_put_bits_where_the_error_is(tiny_model_factory, tmp_path):
    import llmpress

    res = llmpress.compress(tiny_model_factory("llama"), "shiftadd-mixed-2.2", out=tmp_path / "m", nsamples=8,
                            seqlen=32, progress=False, keep_model=True)
    alloc = res.summary["allocation"]
    assert 2.0 < alloc["bits per weight"] <= 2.2 and set(alloc["layers"]) <= {"2 bits", "3 bits"}
    assert alloc["layers"].get("3 bits", 0) >= 1
    loaded, _ = llmpress.load(tmp_path / "m")
    widths = [m.bits for m in loaded.modules() if isinstance(m, BCQLinear)]
    assert set(widths) == {2, 3}
    # every linear got the width the plan chose (the preset rotates first: the profile must name the
    # linears as the pipeline does, down_proj behind its online Hadamard included)
    assert {f"{b} bits": widths.count(b) for b in (2, 3)} == alloc["layers"]
    weights = sum(m.in_features * m.out_features for m in loaded.modules() if isinstance(m, BCQLinear))
    codes = sum(m.bits * m.in_features * m.out_features for m in loaded.modules() if isinstance(m, BCQLinear))
    assert codes / weights <= 2.2


def test_the_knapsack_bit_choice_beats_every_other_choice_on_its_objective():
    """On measured per-layer errors, the allocation's summed error is the least of all choices
    that fit the average (brute force over 6 layers)."""
    import itertools

    from llmpress.compress.factor.knapsack import Option, allocate_layers

    g = torch.Generator().manual_seed(0)
    sizes = [int(s) for s in torch.randint(50, 200, (6,), generator=g)]
    tables = {}
    for i, n in enumerate(sizes):
        e2 = float(torch.rand(1, generator=g)) * 10
        tables[f"l{i}"] = [Option(1 - 2 / 32, e2, 2 * n, {"bits": 2}), Option(1 - 3 / 32, e2 * 0.3, 3 * n, {"bits": 3})]
    dense = {f"l{i}": 32 * n for i, n in enumerate(sizes)}
    plan = allocate_layers(tables, dense, 1 - 2.4 / 32, buckets=100_000)
    got = sum(c.error for c in plan.choice.values())
    best = min(
        sum(tables[f"l{i}"][j].error for i, j in enumerate(pick))
        for pick in itertools.product((0, 1), repeat=6)
        if sum(tables[f"l{i}"][j].bits for i, j in enumerate(pick)) <= 2.4 * sum(sizes)
    )
    assert got == pytest.approx(best)
