"""Statistics hooks: exact Hessians, shared inputs, early stop, spilled inputs."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from llmpress.compress.stats import (
    InputStats,
    SpillArena,
    SpilledTensors,
    StopForward,
    all_finite,
    gram_update,
    symmetrize,
)


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 8), nn.Linear(16, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.a(x) * self.b(x))


@pytest.mark.parametrize("panel", [256, 7, 1])
def test_gram_update_is_the_symmetric_product(panel):
    x = torch.randn(300, 24)
    acc = torch.zeros(24, 24)
    gram_update(acc, x[:100].contiguous(), panel=panel)
    gram_update(acc, x[100:].contiguous(), panel=panel)
    assert torch.allclose(symmetrize(acc), x.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40])
def test_symmetrize_in_place_strip_by_strip(n):
    x = torch.randn(3 * n + 2, n, dtype=torch.float64)
    full = x.T @ x
    acc = torch.triu(full) + torch.tril(torch.randn(n, n, dtype=torch.float64), -1)   # junk below
    out = symmetrize(acc, rows=4)
    assert out.data_ptr() == acc.data_ptr()
    assert torch.equal(out, torch.triu(full) + torch.triu(full, 1).T)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_entry(bad):
    t = torch.randn(64, 64)
    assert all_finite(t) and all_finite(torch.zeros(0))
    t[17, 3] = bad
    assert not all_finite(t)


def test_shared_inputs_share_one_hessian_and_the_forward_stops_early():
    torch.manual_seed(0)
    model = _TwoHeads()
    batches = [torch.randn(5, 16) for _ in range(3)]
    c_runs = []
    model.c.register_forward_pre_hook(lambda m, a: c_runs.append(1))
    with InputStats({"a": model.a, "b": model.b}) as stats:
        for x in batches:
            stats.begin_batch()
            with pytest.raises(StopForward):
                model(x)
    h = stats.hessians()
    x = torch.cat(batches)
    assert torch.allclose(h["a"], 2 * x.T @ x / x.shape[0], rtol=1e-5, atol=1e-5)
    assert h["a"] is h["b"] and stats.owner == {"a": "a", "b": "a"}
    assert not c_runs                                    # nothing after the watched linears ran


@pytest.mark.parametrize("budget", [0, 1 << 30])
def test_spilled_tensors_round_trip_and_the_arena_is_reused(budget):
    arena = SpillArena()
    for _round in range(2):
        kept = SpilledTensors(budget, arena)
        tensors = [torch.randn(3, 7, 5) for _ in range(3)] + [torch.arange(6, dtype=torch.float32),
                                                              torch.randn(2, 9, dtype=torch.bfloat16)]   # bf16 forwards
        for t in tensors:
            kept.append(t)
        assert len(kept) == 5 and all(torch.equal(kept[i], t) and kept[i].dtype == t.dtype for i, t in enumerate(tensors))
        assert (kept.file is not None) == (budget == 0)
        other = SpilledTensors(0, arena)                 # a second spill alive at once: another file
        other.append(torch.ones(2))
        assert torch.equal(other[0], torch.ones(2)) and other.file is not kept.file
        files = {id(f) for f in (other.file, kept.file) if f is not None}
        other.close()
        kept.close()
    assert len(arena._all) == (1 if budget else 2)     # the second round reused the first's files
    assert files <= {id(f) for f in arena._all}
    arena.close()


@pytest.mark.parametrize("budget", [1 << 20, 0])
def test_drain_yields_in_order_and_frees_each_tensor_in_ram(budget):
    kept = SpilledTensors(budget)
    tensors = [torch.randn(4, 3) for _ in range(3)]
    for t in tensors:
        kept.append(t)
    seen, refs = [], []
    for i, x in enumerate(kept.drain()):
        assert torch.equal(x, tensors[i])
        if budget:   # the kept copy was freed once the loop moved past it
            assert kept.in_memory[i] is None and all(r() is None for r in refs)
        refs.append(weakref.ref(x))
        seen.append(x * 2)
    assert len(seen) == 3 and len(kept) == 0 and kept.file is None   # closed


def test_reset_keeps_the_hooks_removable():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with InputStats({"a": model[0]}, stop_when_seen=False) as stats:
        stats.begin_batch()
        model(torch.randn(2, 4))
        stats.reset()
        stats.begin_batch()
        model(torch.randn(3, 4))
    assert stats.tokens["a"] == 3                       # only what came after the reset
    assert not model[0]._forward_pre_hooks              # and no hook left behind


def test_hooks_hold_no_input_once_they_are_removed():
    from llmpress.compress.stats import InputRecorder

    model = _TwoHeads()
    for recorder in (InputStats({"a": model.a, "c": model.c}, stop_when_seen=False),
                     InputRecorder({"a": model.a, "c": model.c})):
        with recorder, torch.no_grad():
            recorder.begin_batch()
            x = torch.randn(2, 16)
            hidden = model.a(x) * model.b(x)
            model.c(hidden)
        refs = [weakref.ref(x), weakref.ref(hidden)]
        del x, hidden
        # the recorder lives on (GPTAQ reads it through the block) but the last batch's inputs do not
        assert all(r() is None for r in refs)


def test_slab_copies_are_equal_aligned_and_independent():
    from llmpress.compress.stats import Slabs

    slabs = Slabs()
    sources = [torch.randn(3, 5), torch.randn(7), torch.randn(2, 2, 3).double()]
    copies = [slabs.copy(t) for t in sources]
    for src, copy in zip(sources, copies):
        assert torch.equal(src, copy) and copy.dtype == src.dtype
        assert copy.data_ptr() % 64 == 0
    sources[0].zero_()
    assert not torch.equal(copies[0], sources[0])   # a copy, not a view of the source
    assert copies[0].untyped_storage().data_ptr() == copies[1].untyped_storage().data_ptr()   # one buffer


def test_phase_clock_times_phases_exclusively_and_counts_linear_flops():
    import time

    from llmpress.compress.phases import PhaseClock, add_flops, phase

    linear = nn.Linear(16, 8)
    with PhaseClock() as clock:
        start = time.perf_counter()
        with phase("outer"):
            time.sleep(0.05)
            with phase("inner"):
                time.sleep(0.05)
                add_flops(10.0)
            linear(torch.randn(3, 4, 16))
        wall = time.perf_counter() - start
    add_flops(5.0)   # no clock: ignored
    outer, inner = clock.totals["outer"], clock.totals["inner"]
    # the nested phase's time is not counted in its parent's: together they make the wall time
    assert outer.seconds >= 0.05 and inner.seconds >= 0.05
    assert abs(outer.seconds + inner.seconds - wall) < 0.01
    assert inner.flops == 10.0 and outer.flops == 2.0 * 16 * 8 * 12
    assert outer.calls == inner.calls == 1
    linear(torch.randn(2, 16))
    assert outer.flops == 2.0 * 16 * 8 * 12   # the hook is gone with the clock
