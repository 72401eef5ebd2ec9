# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The closed-form re-fit solvers on small tensors."""

from __future__ import annotations

import torch

from mergekit_moe2dense.refit import (
    LeastSquaresStats,
    fit_channel_scale,
    fit_down_proj,
    regmean_merge,
    squared_error,
)


def test_least_squares_recovers_a_known_linear_map():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(6, 10, generator=g, dtype=torch.float64)
    stats = LeastSquaresStats()
    for _ in range(3):  # accumulated over batches
        h = torch.randn(50, 10, generator=g, dtype=torch.float64)
        stats.add_batch(h, h @ true.T)
    torch.testing.assert_close(fit_down_proj(stats, damping=1e-10), true, rtol=1e-6, atol=1e-6)


def test_channel_scale_recovers_known_scales():
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([0.5, 2.0, -1.0, 3.0], dtype=torch.float64)
    z = torch.randn(40, 4, generator=g, dtype=torch.float64)
    stats = LeastSquaresStats()
    stats.add_batch(torch.randn(40, 3, generator=g), z * scales, output=z)
    torch.testing.assert_close(fit_channel_scale(stats), scales)


def test_fits_are_never_worse_than_the_unfitted_projection():
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        h = torch.randn(80, 12, generator=g, dtype=torch.float64)
        down = torch.randn(5, 12, generator=g, dtype=torch.float64)
        y = torch.tanh(h @ torch.randn(12, 5, generator=g, dtype=torch.float64)) + 0.1 * torch.randn(
            80, 5, generator=g, dtype=torch.float64
        )
        stats = LeastSquaresStats()
        stats.add_batch(h, y, output=h @ down.T)
        error = lambda d, y=y, h=h: float(((y - h @ d.T) ** 2).sum())  # noqa: E731
        scaled = fit_channel_scale(stats)[:, None] * down
        assert error(fit_down_proj(stats, damping=1e-6)) <= error(scaled) + 1e-9
        assert error(scaled) <= error(down) + 1e-9


def test_squared_error_from_running_sums():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(30, 7, generator=g, dtype=torch.float64)
    y = torch.randn(30, 4, generator=g, dtype=torch.float64)
    down = torch.randn(4, 7, generator=g, dtype=torch.float64)
    stats = LeastSquaresStats()
    stats.add_batch(h[:10], y[:10])
    stats.add_batch(h[10:], y[10:])
    assert abs(squared_error(stats, down) - float(((y - h @ down.T) ** 2).sum())) < 1e-8


def test_regmean_merge():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(40, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    grams = [x.T @ x for x in xs]
    ws = [torch.randn(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    # one expert with all the weight is returned unchanged; equal experts stay equal
    torch.testing.assert_close(regmean_merge([0.0, 1.0, 0.0], ws, grams, 1e-12), ws[1])
    torch.testing.assert_close(regmean_merge([0.2, 0.3, 0.5], [ws[0]] * 3, grams, 1e-12), ws[0])
    # it minimises the weighted output error on each expert's own inputs, unlike the plain average
    weights = [0.2, 0.3, 0.5]
    error = lambda m: sum(w * float(((x @ m.T - x @ p.T) ** 2).sum()) for w, x, p in zip(weights, xs, ws))  # noqa: E731
    merged = regmean_merge(weights, ws, grams, 1e-12)
    average = sum(w * p for w, p in zip(weights, ws))
    assert error(merged) < error(average)
    perturbed = merged + 1e-3 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    assert error(merged) < error(perturbed)


def test_an_undamped_ones_column_fits_the_bias_as_centring_does():
    """[D, b] on the features [h, 1] with the ones column undamped (`free=1`): D is the ridge
    solution of the centred problem and b = mean(y) - D mean(h), however strong the damping (an
    intercept the ridge does not pull towards 0)."""
    g = torch.Generator().manual_seed(3)
    h = 2 * torch.randn(400, 6, generator=g, dtype=torch.float64) + 3  # far from centred
    y = h @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 4 + torch.randn(400, 5, generator=g)
    stats = LeastSquaresStats()
    stats.add_batch(torch.cat([h, torch.ones(400, 1, dtype=torch.float64)], dim=1), y)
    damping = 0.5
    got = fit_down_proj(stats, damping, free=1)
    lam = damping * float((h * h).sum(0).mean())  # relative to the damped features' energy
    hc, yc = h - h.mean(0), y - y.mean(0)
    down = torch.linalg.solve(hc.T @ hc + lam * torch.eye(6, dtype=torch.float64), hc.T @ yc).T
    torch.testing.assert_close(got[:, :-1], down)
    torch.testing.assert_close(got[:, -1], y.mean(0) - down @ h.mean(0))
    assert not torch.allclose(fit_down_proj(stats, damping)[:, -1], got[:, -1], atol=1e-2)  # damped: shrunk
