# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Closed-form re-fits of a dense MLP's down projection to the MoE layer output.

With the dense MLP's intermediate activations h_t = act(G x_t) * (U x_t) [I] and
the MoE block's output y_t [H] on the same inputs x_t (calibration tokens), the
output z_t = D h_t is linear in D, so the best D is a least-squares problem.
Statistics are accumulated batch by batch (as GPTQ's `add_batch`), then solved:

- `down_proj` (ridge regression, as in RegMean/GPTQ-style layer-wise fitting):
      D* = argmin_D sum_t ||y_t - D h_t||^2 + lam ||D||^2
         = (Y^T H) (H^T H + lam I)^-1,   lam = damping * mean(diag(H^T H))
  (relative damping as GPTQ's `percdamp`, so it is scale-free);
- `scale` (one factor per output channel j, keeping D's shape of solution):
      s_j = sum_t z_tj y_tj / sum_t z_tj^2,   D* = diag(s) D.

Both minimise the squared error over their parameter sets and include the
un-fitted D (s = 1, or D itself when lam = 0), so on the calibration tokens the
fit is never worse than no fit (up to the ridge term).

The gate/up merge can also be fitted, by RegMean (Jin et al. 2023,
arXiv:2212.09849): with C_e = X_e^T X_e the Gram matrix of the tokens routed to
expert e and w_e the method's weight, the W minimising
sum_e w_e ||X_e W^T - X_e W_e^T||^2 is

      W* = (sum_e w_e W_e C_e) (sum_e w_e C_e + lam I)^-1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

__all__ = ["LeastSquaresStats", "fit_channel_scale", "fit_down_proj", "regmean_merge", "squared_error"]


@dataclass
class LeastSquaresStats:
    """Running sums for the re-fit of one layer, in float64."""

    gram: torch.Tensor | None = None  # H^T H [I, I]
    cross: torch.Tensor | None = None  # H^T Y [I, H]
    zy: torch.Tensor | None = None  # sum_t z_tj y_tj [H]
    zz: torch.Tensor | None = None  # sum_t z_tj^2 [H]
    yy: float = 0.0  # sum_t ||y_t||^2
    tokens: int = field(default=0)

    def add_batch(self, hidden: torch.Tensor, target: torch.Tensor, output: torch.Tensor | None = None) -> None:
        """hidden: intermediate activations [N, I]; target: MoE output [N, H];
        output: the current dense output D h [N, H] (needed for `scale`)."""
        h, y = hidden.double(), target.double()
        if self.gram is None:
            self.gram = torch.zeros(h.shape[1], h.shape[1], dtype=torch.float64, device=h.device)
            self.cross = torch.zeros(h.shape[1], y.shape[1], dtype=torch.float64, device=h.device)
            self.zy = torch.zeros(y.shape[1], dtype=torch.float64, device=h.device)
            self.zz = torch.zeros(y.shape[1], dtype=torch.float64, device=h.device)
        self.gram += h.T @ h
        self.cross += h.T @ y
        self.yy += float((y * y).sum())
        if output is not None:
            z = output.double()
            self.zy += (z * y).sum(0)
            self.zz += (z * z).sum(0)
        self.tokens += h.shape[0]


def fit_down_proj(stats: LeastSquaresStats, damping: float) -> torch.Tensor:
    """Ridge solution D* [H, I] (float64) of sum_t ||y_t - D h_t||^2."""
    gram = stats.gram.clone()
    lam = damping * float(gram.diagonal().mean())
    if lam <= 0:  # all-zero activations: any D fits; keep it finite
        lam = 1e-12
    gram.diagonal().add_(lam)
    solution = torch.linalg.solve(gram, stats.cross)  # [I, H]
    return solution.T.contiguous()


def fit_channel_scale(stats: LeastSquaresStats) -> torch.Tensor:
    """Per-output-channel factors s [H] (float64); 1 where the dense output is all zero."""
    scale = torch.ones_like(stats.zz)
    nonzero = stats.zz > 0
    scale[nonzero] = stats.zy[nonzero] / stats.zz[nonzero]
    return scale


def squared_error(stats: LeastSquaresStats, down: torch.Tensor) -> float:
    """sum_t ||y_t - D h_t||^2 from the running sums:
    ||Y||^2 - 2 tr(D H^T Y) + tr(D H^T H D^T)."""
    d = down.double().to(stats.gram.device)
    return stats.yy - 2.0 * float((d.T * stats.cross).sum()) + float(((d @ stats.gram) * d).sum())


def regmean_merge(
    weights: Sequence[float], projections: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], damping: float
) -> torch.Tensor:
    """RegMean merge [O, H] (float64) of projections W_e [O, H] with input Grams C_e [H, H]."""
    total = sum(w * c.double() for w, c in zip(weights, grams) if w != 0.0)
    if not bool(total.any()):  # no calibration token reached these experts: plain weighted sum
        return sum(w * p.double() for w, p in zip(weights, projections) if w != 0.0)
    numerator = sum(w * p.double() @ c.double() for w, p, c in zip(weights, projections, grams) if w != 0.0)
    lam = damping * float(total.diagonal().mean())
    total = total + max(lam, 1e-12) * torch.eye(total.shape[0], dtype=total.dtype, device=total.device)
    # W* total = numerator, total symmetric: solve total W*^T = numerator^T
    return torch.linalg.solve(total, numerator.T).T.contiguous()
