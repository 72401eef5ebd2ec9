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

Beyond the closed forms, `fit_mlp` fits all three projections (gate G, up U,
down D) of f(x) = D (act(G x) * U x) to y by Adam over minibatches of tokens:

      min_{G,U,D} sum_t ||y_t - f(x_t)||^2 / sum_t ||y_t||^2

from a given start (the closed-form re-fit), with a per-projection step size
lr * rms(W_start) (scale-free, like the relative damping), linear warm-up and
cosine decay. A held-out part of the tokens never enters a gradient; the
returned projections are those of the step with the lowest held-out error, the
start included (step 0), so the result is never worse than the start there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "FitSettings",
    "LeastSquaresStats",
    "MLPFit",
    "fit_channel_scale",
    "fit_down_proj",
    "fit_mlp",
    "mlp_error",
    "regmean_merge",
    "squared_error",
]


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
        # in place: no [I, I] temporary beside the running sum (100 MB of float64 at I = 3584)
        self.gram.addmm_(h.T, h)
        self.cross.addmm_(h.T, y)
        self.yy += float((y * y).sum())
        if output is not None:
            z = output.double()
            self.zy += (z * y).sum(0)
            self.zz += (z * z).sum(0)
        self.tokens += h.shape[0]


def fit_down_proj(stats: LeastSquaresStats, damping: float) -> torch.Tensor:
    """Ridge solution D* [H, I] (float64) of sum_t ||y_t - D h_t||^2.

    The damping is added to the running Gram matrix in place and taken off again after the
    solve (no copy of the [I, I] matrix beside the solver's own factorisation)."""
    gram = stats.gram
    lam = damping * float(gram.diagonal().mean())
    if lam <= 0:  # all-zero activations: any D fits; keep it finite
        lam = 1e-12
    diagonal = gram.diagonal().clone()
    inference = torch.inference_mode(gram.is_inference())  # sums made in a calibration forward
    with inference:
        gram.diagonal().add_(lam)
    try:
        solution = torch.linalg.solve(gram, stats.cross)  # [I, H]
    finally:
        with inference:
            gram.diagonal().copy_(diagonal)  # exactly the sums again
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


@dataclass(frozen=True)
class FitSettings:
    """The gradient fit's settings (`refit: fit`'s `fit_*` parameters)."""

    steps: int = 300
    lr: float = 0.1  # relative: each projection's Adam step size is lr * rms(its start)
    batch_tokens: int = 1024
    holdout: float = 0.1  # fraction of the tokens held out to pick the best step
    seed: int = 0


@dataclass
class MLPFit:
    """What `fit_mlp` returns: the best projections and the held-out errors."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    start_error: float  # relative squared error of the start on the held-out tokens
    best_error: float  # ... of the returned projections (<= start_error)
    best_step: int  # 0: the start was kept
    holdout_tokens: int


def _mlp(x, gate, up, down, act):
    return (act(x @ gate.T) * (x @ up.T)) @ down.T


@torch.no_grad()
def mlp_error(x, y, gate, up, down, act, chunk: int = 8192) -> float:
    """sum_t ||y_t - D (act(G x_t) * U x_t)||^2 / sum_t ||y_t||^2, in chunks of tokens."""
    err, total = 0.0, 0.0
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        err += float(((ys - _mlp(xs, gate, up, down, act)) ** 2).sum(dtype=torch.float64))
        total += float((ys * ys).sum(dtype=torch.float64))
    return err / max(total, 1e-30)


def fit_mlp(
    x: torch.Tensor,
    y: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    settings: FitSettings,
) -> MLPFit:
    """Adam fit of gate [I, H], up [I, H], down [H, I] to y [N, H] on x [N, H], from
    the given start; the best step by held-out error (see the module docstring).

    Tokens are split at random (`settings.seed`) into a held-out part (`holdout` of
    them, at least one) and the rest; minibatches of `batch_tokens` are drawn from
    the rest without replacement, epoch after epoch. Float32 on x's device.
    """
    n = x.shape[0]
    generator = torch.Generator().manual_seed(settings.seed)
    start = [t.detach().float().clone() for t in (gate, up, down)]
    if n < 2:
        raise ValueError(f"fit_mlp needs at least 2 tokens, got {n}")
    held = min(max(1, round(settings.holdout * n)), n - 1)
    order = torch.randperm(n, generator=generator).to(x.device)
    x_hold, y_hold = x[order[:held]].float(), y[order[:held]].float()
    x_train, y_train = x[order[held:]].float(), y[order[held:]].float()
    best_error = start_error = mlp_error(x_hold, y_hold, *start, act)
    best, best_step = [t.clone() for t in start], 0
    params = [t.clone().requires_grad_(True) for t in start]
    groups = [
        {"params": [p], "lr": settings.lr * max(float(t.pow(2).mean().sqrt()), 1e-12)} for p, t in zip(params, start)
    ]
    optimiser = torch.optim.Adam(groups)
    warmup = max(1, settings.steps // 20)

    def factor(step: int) -> float:  # linear warm-up, then cosine decay to 10%
        return min((step + 1) / warmup, 0.1 + 0.45 * (1 + math.cos(math.pi * step / settings.steps)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    scale = float((y_train * y_train).sum(dim=1).mean()) or 1.0
    batch = min(settings.batch_tokens, x_train.shape[0])
    queue = torch.empty(0, dtype=torch.long)
    for step in range(1, settings.steps + 1):
        if len(queue) < batch:  # the next epoch's order, appended
            queue = torch.cat([queue, torch.randperm(x_train.shape[0], generator=generator)])
        pick, queue = queue[:batch].to(x.device), queue[batch:]
        residual = y_train[pick] - _mlp(x_train[pick], *params, act)
        loss = residual.pow(2).sum(dim=1).mean() / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        error = mlp_error(x_hold, y_hold, *(p.detach() for p in params), act)
        if error < best_error:  # NaN and inf never win
            best_error, best_step = error, step
            best = [p.detach().clone() for p in params]
    return MLPFit(*best, start_error=start_error, best_error=best_error, best_step=best_step, holdout_tokens=held)
