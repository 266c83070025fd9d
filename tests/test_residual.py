"""GPTAQ and ResComp: the solver's residual mode and the pipeline's full-precision stream."""

from __future__ import annotations

import pytest
import torch

import llmpress
from llmpress.compress import pipeline
from llmpress.compress.quant.gptq import Residual, gptq_quantize, residual_projection
from llmpress.compress.recipe import parse_recipe
from llmpress.layers import QuantLinear


def _dequant(result) -> torch.Tensor:
    return QuantLinear.from_quantized(result, None, torch.float32).dequantize(torch.float32)


def _problem(seed=0, rows=48, cols=192, tokens=1536, drift=0.3):
    """A layer, correlated inputs X with a few outlier channels, and a structured drift X̃ = X + E."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols ** 0.5
    X = torch.randn(tokens, cols, generator=g) @ mix
    X[:, torch.randperm(cols, generator=g)[:6]] *= 4
    E = drift * X @ (torch.randn(cols, cols, generator=g) / cols ** 0.5)
    W = torch.randn(rows, cols, generator=g)
    H = 2 * X.T @ X / tokens
    D = 2 * E.T @ X / tokens
    return W, X, X + E, H, D


def _asymmetric_error(W_hat, W, X, X_fp) -> float:
    """‖Ŵ X − W X̃‖² / ‖W X̃‖²: the compressed layer on its own inputs against the original model."""
    return float(((X @ W_hat.T - X_fp @ W.T) ** 2).sum() / ((X_fp @ W.T) ** 2).sum())


def test_residual_projection_rows_solve_the_trailing_system():
    from llmpress.compress.quant.hessian import damped_inverse_cholesky

    _W, _X, _X_fp, H, D = _problem(cols=40, tokens=400)
    U, damp = damped_inverse_cholesky(H.double(), 0.01)
    P = residual_projection(D.double(), U)
    H_damped = H.double() + damp * torch.diagonal(H.double()).mean() * torch.eye(40, dtype=torch.float64)
    for j in (0, 7, 38):
        expected = D.double()[j, j + 1:] @ torch.linalg.inv(H_damped[j + 1:, j + 1:])
        assert torch.allclose(P[j, j + 1:], expected, rtol=1e-8, atol=1e-10)
        assert P[j, : j + 1].abs().max() == 0


@pytest.mark.parametrize("kw", [
    dict(bits=3, group_size=-1), dict(bits=3, group_size=64, act_order=True),
    dict(bits=2, group_size=32, act_order=True, static_groups=True),
    dict(bits=3, group_size=96, block_size=64),   # a group that spans two lazy blocks
])
def test_identical_streams_reduce_gptaq_and_rescomp_to_gptq(kw):
    W, _X, _, H, _ = _problem()
    gptq = gptq_quantize(W, H, **kw)
    zero = torch.zeros_like(H)
    for residual in (Residual(zero), Residual(zero, alpha=1.0),
                     Residual(zero, rescomp=True, form="delta", mode="org"),
                     Residual(zero, rescomp=True, form="delta", mode="allw")):
        other = gptq_quantize(W, H, residual=residual, **kw)
        assert torch.equal(other.codes, gptq.codes), residual
        assert torch.equal(other.scales, gptq.scales)
    # ResComp's own form re-compensates (W⁰ − W)·X, which GPTQ's feedback already did: it does
    # not reduce to GPTQ (documented in docs/methods/gptaq-rescomp.md).
    paper = gptq_quantize(W, H, residual=Residual(zero, rescomp=True, form="paper"), **kw)
    assert not torch.equal(paper.codes, gptq.codes)


@pytest.mark.parametrize("kw", [dict(bits=3, group_size=-1), dict(bits=3, group_size=64, act_order=True)])
def test_gptaq_lowers_the_error_against_the_full_precision_output(kw, capsys):
    W, X, X_fp, H, D = _problem()
    errors = {"gptq": _asymmetric_error(_dequant(gptq_quantize(W, H, **kw)), W, X, X_fp)}
    for alpha in (0.25, 1.0):
        errors[f"gptaq a={alpha}"] = _asymmetric_error(
            _dequant(gptq_quantize(W, H, residual=Residual(D, alpha=alpha), **kw)), W, X, X_fp)
        for form in ("paper", "delta"):
            res = Residual(D, alpha=alpha, rescomp=True, alpha2=alpha, form=form, mode="org")
            errors[f"rescomp[{form}] a={alpha}"] = _asymmetric_error(
                _dequant(gptq_quantize(W, H, residual=res, **kw)), W, X, X_fp)
    with capsys.disabled():
        print("\n  " + ", ".join(f"{k}: {v:.4f}" for k, v in errors.items()))
    assert errors["gptaq a=0.25"] < errors["gptq"]
    assert errors["gptaq a=1.0"] < errors["gptaq a=0.25"]
    # Anchoring the residual on the original weights (our form) helps on this objective.
    assert errors["rescomp[delta] a=1.0"] < errors["gptaq a=1.0"]


# -- the pipeline's two streams ------------------------------------------------------------------

def _recipe(residual="gptaq", **extra):
    return parse_recipe({"name": "t", "stages": [
        {"method": "gptq", "bits": 3, "group_size": 32, "residual": residual, **extra}]})


def _shards(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("model-*.safetensors")):
        out.update(load_file(f))
    return out


def test_alpha_zero_gives_gptq_exactly(tiny_model_factory, tmp_path):
    """The full-precision stream must not disturb the compressed one: with α = 0 the P term
    vanishes and every tensor equals plain GPTQ's."""
    folder = tiny_model_factory("llama")
    kw = dict(nsamples=4, seqlen=32, progress=False)
    llmpress.compress(folder, _recipe("none"), out=tmp_path / "gptq", **kw)
    llmpress.compress(folder, _recipe("gptaq", alpha=0.0), out=tmp_path / "a0", **kw)
    llmpress.compress(folder, _recipe("gptaq"), out=tmp_path / "gptaq", **kw)
    gptq, a0, gptaq = _shards(tmp_path / "gptq"), _shards(tmp_path / "a0"), _shards(tmp_path / "gptaq")
    assert gptq.keys() == a0.keys()
    assert all(torch.equal(gptq[k], a0[k]) for k in gptq)
    assert any(not torch.equal(gptq[k], gptaq[k]) for k in gptq if k.endswith("qweight"))


def test_cross_statistics_pair_the_two_streams_token_for_token(tiny_model_factory, tmp_path, monkeypatch):
    from llmpress.compress.calibration import calibration_windows

    folder = tiny_model_factory("llama")
    seen = []
    real = pipeline.compress_linear
    monkeypatch.setattr(pipeline, "compress_linear", lambda stage, linear, stats, **kw: (
        seen.append({k: v.clone() for k, v in stats.items() if torch.is_tensor(v)}), real(stage, linear, stats, **kw))[1])
    result = llmpress.compress(folder, _recipe("rescomp"), out=tmp_path / "o", nsamples=4, seqlen=32,
                               progress=False, keep_model=True)
    assert len(seen) == 7 * 3 and all("cross" in s for s in seen)
    assert seen[0]["cross"].abs().max() == 0          # block 0's q/k/v: both streams are the embeddings

    dense, tokenizer = llmpress.load(folder)
    windows = calibration_windows(tokenizer, "wiki/train", 4, 32, seed=0)

    def q_input(model, block):
        got = []
        handle = model.model.layers[block].self_attn.q_proj.register_forward_pre_hook(
            lambda m, a: got.append(a[0].reshape(-1, a[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=windows)
        handle.remove()
        return got[0]

    x_fp, x = q_input(dense, 1), q_input(result.model, 1)
    expected = 2 * (x_fp - x).T @ x / x.shape[0]
    assert expected.abs().max() > 0
    assert torch.allclose(seen[7]["cross"], expected, rtol=1e-3, atol=1e-5 * expected.abs().max())
    hessian = 2 * x.T @ x / x.shape[0]
    assert torch.allclose(seen[7]["hessian"], hessian, rtol=1e-3, atol=1e-5 * hessian.abs().max())


def test_resume_continues_both_streams(tiny_model_factory, tmp_path, monkeypatch):
    """A resumed GPTAQ run advances the full-precision stream through the finished blocks'
    original weights: its tensors equal an uninterrupted run's."""
    from .test_pipeline import crash_then_resume

    assert crash_then_resume(tiny_model_factory("llama"), _recipe("gptaq"), tmp_path, monkeypatch) == [2]
