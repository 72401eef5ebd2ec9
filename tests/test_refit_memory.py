# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What the re-fit holds per layer: no copies of its sums, no layer of experts at the solve."""

from __future__ import annotations

import pytest
import torch
from mergekit.options import MergeOptions

from helpers import make_config, state_of
from mergekit_moe2dense.build import build_dense
from mergekit_moe2dense.calibration import sequential
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
