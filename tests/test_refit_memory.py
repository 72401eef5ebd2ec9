# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What the re-fit holds per layer: no copies of its sums, no layer of experts at the solve."""

from __future__ import annotations

import tracemalloc

import pytest
import torch
from mergekit.options import MergeOptions

from helpers import make_config, state_of
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration.refit import fitters as sequential
from mergekit_moe2dense.refit import LeastSquaresStats, fit_down_proj, squared_error


def test_down_proj_solve_leaves_the_sums_as_they_were():
    """The damping goes onto the Gram matrix in place and comes off exactly, also for sums
    accumulated under inference mode (as in the layer stream's forward); the solution is the
    ridge regression's."""
    generator = torch.Generator().manual_seed(0)
    hidden, target = torch.randn(200, 12, generator=generator), torch.randn(200, 5, generator=generator)
    stats = LeastSquaresStats()
    with torch.inference_mode():
        for part in range(4):
            stats.add_batch(hidden[part * 50 : (part + 1) * 50], target[part * 50 : (part + 1) * 50])
    gram, cross = hidden.double().T @ hidden.double(), hidden.double().T @ target.double()
    torch.testing.assert_close(stats.gram, gram, rtol=1e-12, atol=1e-10)
    before = stats.gram.clone()
    down = fit_down_proj(stats, damping=0.1)
    assert torch.equal(stats.gram, before)
    lam = 0.1 * float(gram.diagonal().mean())
    expected = torch.linalg.solve(gram + lam * torch.eye(12, dtype=torch.float64), cross).T
    torch.testing.assert_close(down, expected, rtol=1e-10, atol=1e-12)
    residual = target.double() - hidden.double() @ down.T
    torch.testing.assert_close(squared_error(stats, down), float((residual**2).sum()), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("refit", ["down_proj", "scale"])
def test_refit_frees_the_sparse_block_before_the_solve(random_moe, calib_dir, tmp_path, monkeypatch, refit):
    """At each layer's solve the sparse block's experts are freed (meta), and the converted
    model is the same as when they are kept to the end of the layer."""
    blocks, freed_at_solve = [], []
    of = sequential.SparseBlock.of.__func__

    def spy_of(cls, *args):
        blocks.append(of(cls, *args))
        return blocks[-1]

    solve = sequential.fit_down_proj if refit == "down_proj" else sequential.fit_channel_scale
    name = "fit_down_proj" if refit == "down_proj" else "fit_channel_scale"

    def spy_solve(*args, **kwargs):
        freed_at_solve.append(all(p.is_meta for p in blocks[-1].module.parameters()))
        return solve(*args, **kwargs)

    monkeypatch.setattr(sequential.SparseBlock, "of", classmethod(spy_of))
    monkeypatch.setattr(sequential, name, spy_solve)
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir, refit=refit)
    build_dense(config, str(tmp_path / "freed"), MergeOptions(quiet=True))
    assert freed_at_solve == [True, True]  # both layers

    monkeypatch.setattr(sequential.SparseBlock, "release", lambda self, shared: None)
    build_dense(config, str(tmp_path / "kept"), MergeOptions(quiet=True))
    freed, kept = state_of(tmp_path / "freed"), state_of(tmp_path / "kept")
    assert freed.keys() == kept.keys()
    for key in freed:
        assert torch.equal(freed[key], kept[key]), key


@pytest.mark.parametrize("shape", [(64, 12), (300, 700), (1000, 1030)])
def test_running_gram_is_symmetric_bit_for_bit(shape):
    """The in-place solve restores the Gram matrix's upper triangle from its lower one: exact
    only because the accumulated sums are symmetric bit for bit (odd sizes: BLAS edge tiles)."""
    generator = torch.Generator().manual_seed(1)
    stats = LeastSquaresStats()
    for _ in range(3):
        stats.add_batch(torch.randn(*shape, generator=generator), torch.randn(shape[0], 4, generator=generator))
    assert torch.equal(stats.gram, stats.gram.T)


def test_down_proj_solve_factors_the_gram_in_place(monkeypatch):
    """On the CPU no [I, I] copy is made: not the LU solver's (torch.linalg.solve is not
    called), and numpy holds no more than the [I, H] right-hand side during the solve."""
    generator = torch.Generator().manual_seed(2)
    hidden, target = torch.randn(600, 500, generator=generator), torch.randn(600, 8, generator=generator)
    stats = LeastSquaresStats()
    stats.add_batch(hidden, target, output=None)
    before = stats.gram.clone()
    expected = torch.linalg.solve(
        before + 0.01 * float(before.diagonal().mean()) * torch.eye(500).double(), stats.cross
    ).T

    def no_lu(*args, **kwargs):
        raise AssertionError("the LU solver copies the Gram matrix")

    monkeypatch.setattr(torch.linalg, "solve", no_lu)
    tracemalloc.start()
    try:
        down = fit_down_proj(stats, damping=0.01)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < stats.gram.nbytes / 4  # the right-hand side is 500 x 8 doubles
    assert down.is_contiguous() and down.shape == (8, 500)
    torch.testing.assert_close(down, expected, rtol=1e-8, atol=1e-10)
    assert torch.equal(stats.gram, before)


def test_down_proj_solve_falls_back_where_cholesky_fails():
    """A Gram matrix that is not positive definite in floating point (here indefinite) is
    solved by LU instead, and left as it was."""
    gram = torch.diag(torch.tensor([2.0, -1.0, 3.0], dtype=torch.float64))
    gram[0, 2] = gram[2, 0] = 0.5
    cross = torch.arange(6, dtype=torch.float64).reshape(3, 2)
    stats = LeastSquaresStats(gram=gram.clone(), cross=cross)
    down = fit_down_proj(stats, damping=0.0)
    torch.testing.assert_close(down, torch.linalg.solve(gram, cross).T, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats.gram, gram)


def test_refit_sums_wait_for_the_block_to_be_freed(random_moe, calib_dir, tmp_path, monkeypatch):
    """The float64 sums are made after the sparse block's weights are freed (while the batches'
    inputs and outputs cost less than them), and the model is the same bit for bit as with the
    sums made during the forward."""
    blocks, freed_at_add = [], []
    of = sequential.SparseBlock.of.__func__
    add_batch = LeastSquaresStats.add_batch

    def spy_of(cls, *args):
        blocks.append(of(cls, *args))
        return blocks[-1]

    def spy_add_batch(self, *args, **kwargs):
        freed_at_add.append(all(p.is_meta for p in blocks[-1].module.parameters()))
        return add_batch(self, *args, **kwargs)

    monkeypatch.setattr(sequential.SparseBlock, "of", classmethod(spy_of))
    monkeypatch.setattr(LeastSquaresStats, "add_batch", spy_add_batch)
    config = make_config(random_moe["legacy"], "router_weighted", calib_dir, refit="down_proj")
    # 96 tokens in 3 batches: their (x, y) take less memory than the sums (unlike 256 tokens here)
    calibration = config.calibration.model_copy(update={"num_samples": 3, "batch_size": 1})
    config = config.model_copy(update={"calibration": calibration})
    build_dense(config, str(tmp_path / "later"), MergeOptions(quiet=True))
    assert freed_at_add and all(freed_at_add)

    freed_at_add.clear()
    monkeypatch.setattr(sequential.SparseBlock, "nbytes", lambda self, shared: 0)  # no room to wait: at once
    build_dense(config, str(tmp_path / "at_once"), MergeOptions(quiet=True))
    assert freed_at_add and not any(freed_at_add)
    later, at_once = state_of(tmp_path / "later"), state_of(tmp_path / "at_once")
    assert later.keys() == at_once.keys()
    for key in later:
        assert torch.equal(later[key], at_once[key]), key
