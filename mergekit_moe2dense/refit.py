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
cosine decay.

A family whose experts have biases and their own activation (GPT-OSS:
f(x) = D h(G x + b_g, U x + b_u) + b_d, h its clamped SwiGLU) is fitted the same
way: `biases` are fitted with the projections (each with a step size of lr times
the RMS of the pre-activation or output it is added to, so a zero bias moves too),
and `hidden` computes h from the projections and biases (the family's own expert
computation, `MoEFamily.dense_hidden`). The closed forms take a bias as one more
feature that is always 1 (`free` features: not damped, so the ridge pulls D
towards 0 but not the bias; the same solution as centring x and y). A held-out part of the tokens never enters a gradient; the
returned projections are those of the step with the lowest held-out error, the
start included (step 0), so the result is never worse than the start there.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypedDict

import torch
from typing_extensions import Unpack  # typing's own from Python 3.11

__all__ = [
    "FitSettings",
    "LeastSquaresStats",
    "MLPFit",
    "MLPForm",
    "fit_channel_scale",
    "fit_down_proj",
    "fit_mlp",
    "mlp_error",
    "gated_hidden",
    "mlp_forward",
    "regmean_merge",
    "squared_error",
]

BIASES = ("gate_bias", "up_bias", "down_bias")
# h(x, projections): the dense MLP's activations before its down projection, from its
# projections (gate, up: [I, H]; down: [H, I]) and biases (gate_bias, up_bias: [I]; down_bias: [H])
Hidden = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]


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


def _damp(gram: torch.Tensor, damping: float, free: int) -> torch.Tensor:
    """gram + lam I on all but its last `free` features (a bias's ones column: not damped),
    lam = damping * the mean of their diagonal (at least 1e-12, so that it stays solvable)."""
    gram = gram.clone()
    damped = gram.diagonal()[: gram.shape[0] - free]
    damped.add_(_damping(damped, damping))
    return gram


def _damping(diagonal: torch.Tensor, damping: float) -> float:
    """lam = damping * the mean of the damped diagonal (at least 1e-12: all-zero activations
    fit any D, and the system stays solvable)."""
    return max(damping * float(diagonal.mean()), 1e-12) if diagonal.numel() else 0.0


def fit_down_proj(stats: LeastSquaresStats, damping: float, free: int = 0) -> torch.Tensor:
    """Ridge solution D* [H, I] (float64) of sum_t ||y_t - D h_t||^2; the last `free`
    features (a ones column: D*'s last column is the down bias) are not damped.

    The damping is added to the running Gram matrix in place and taken off again after the
    solve; on the CPU the damped matrix is also factored in place (`_cholesky_solve_in_place`):
    the solver's own copy of it was the re-fit's largest allocation (100 MB at I = 3584)."""
    gram = stats.gram
    damped = gram.diagonal()[: gram.shape[0] - free]
    lam = _damping(damped, damping)
    saved = gram.diagonal().clone()
    inference = torch.inference_mode(gram.is_inference())  # sums made in a calibration forward
    with inference:
        damped.add_(lam)
        try:
            solution = (
                _cholesky_solve_in_place(gram, stats.cross)
                if gram.device.type == "cpu" and gram.is_contiguous()
                else None
            )
            if solution is None:  # on a GPU, or not positive definite in floating point
                solution = torch.linalg.solve(gram, stats.cross).T.contiguous()
        finally:
            gram.diagonal().copy_(saved)  # exactly the sums again
    return solution


def _cholesky_solve_in_place(gram: torch.Tensor, cross: torch.Tensor) -> torch.Tensor | None:
    """(gram^-1 cross)^T [H, I] by LAPACK's Cholesky factorisation, written over gram's upper
    triangle and diagonal: a row-major symmetric matrix is its own column-major transpose, so
    `potrf` takes it without a copy and leaves the strict lower triangle alone, from which the
    upper one is copied back (and the diagonal from a copy). None where gram is not positive
    definite in floating point. Either way gram is left as it was.

    The running sums are symmetric bit for bit (entry (i, j) and (j, i) add the same products
    in the same order; `test_refit_memory` checks it), so the copy gives them back exactly."""
    import numpy as np
    from scipy.linalg import lapack

    matrix = gram.numpy().T  # the same memory, column-major
    diagonal = gram.diagonal().clone()
    factor, info = lapack.dpotrf(matrix, lower=1, clean=0, overwrite_a=1)
    if not np.shares_memory(factor, matrix):
        raise RuntimeError("LAPACK's potrf copied the Gram matrix")  # f2py takes it as is: never
    solution = None
    if info == 0:
        # a column-major copy of cross [I, H], solved in place: its transpose is D* in row-major
        rhs, info = lapack.dpotrs(factor, np.asfortranarray(cross.numpy()), lower=1, overwrite_b=1)
        solution = torch.from_numpy(rhs.T) if info == 0 else None
    _mirror_lower_to_upper(gram)
    gram.diagonal().copy_(diagonal)
    return solution


def _mirror_lower_to_upper(matrix: torch.Tensor, block: int = 512) -> None:
    """matrix's strict upper triangle := its strict lower one, transposed; a block of rows at a
    time (no temporary the size of the matrix)."""
    size = matrix.shape[0]
    for start in range(0, size, block):
        end = min(start + block, size)
        matrix[start:end, end:].copy_(matrix[end:, start:end].T)
        square = matrix[start:end, start:end]
        upper = torch.ones_like(square, dtype=torch.bool).triu_(1)
        square[upper] = square.T[upper]


def fit_channel_scale(stats: LeastSquaresStats) -> torch.Tensor:
    """Per-output-channel factors s [H] (float64); 1 where the dense output is all zero."""
    scale = torch.ones_like(stats.zz)
    nonzero = stats.zz > 0
    scale[nonzero] = stats.zy[nonzero] / stats.zz[nonzero]
    return scale


def squared_error(stats: LeastSquaresStats, down: torch.Tensor) -> float:
    """sum_t ||y_t - D h_t||^2 from the running sums:
    ||Y||^2 - 2 tr(D H^T Y) + tr(D H^T H D^T)."""
    total, start = stats.yy, 0
    for rows in down.split(256):  # a block of D's rows at a time: no [H, I] float64 temporaries
        d = rows.double().to(stats.gram.device)
        cross = stats.cross[:, start : start + d.shape[0]]
        total += float(((d @ stats.gram) * d).sum()) - 2.0 * float((d.T * cross).sum())
        start += d.shape[0]
    return total


def regmean_merge(
    weights: Sequence[float],
    projections: Sequence[torch.Tensor],
    grams: Sequence[torch.Tensor],
    damping: float,
    free: int = 0,
) -> torch.Tensor:
    """RegMean merge [O, H] (float64) of projections W_e [O, H] with input Grams C_e [H, H];
    the last `free` inputs (a ones column, whose column of W_e is its bias) are not damped."""
    total = sum(w * c.double() for w, c in zip(weights, grams) if w != 0.0)
    if not bool(total.any()):  # no calibration token reached these experts: plain weighted sum
        return sum(w * p.double() for w, p in zip(weights, projections) if w != 0.0)
    numerator = sum(w * p.double() @ c.double() for w, p, c in zip(weights, projections, grams) if w != 0.0)
    total = _damp(total, damping, free)
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
    """What `fit_mlp` returns: the best projections (and biases) and the held-out errors."""

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    start_error: float  # relative squared error of the start on the held-out tokens
    best_error: float  # ... of the returned projections (<= start_error)
    best_step: int  # 0: the start was kept
    holdout_tokens: int
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # the fitted biases (those given)


def gated_hidden(act: Callable[[torch.Tensor], torch.Tensor]) -> Hidden:
    """h = act(G x + b_g) * (U x + b_u): the SwiGLU of every family but GPT-OSS (biases optional)."""

    def hidden(x: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
        gate, up = x @ p["gate"].T, x @ p["up"].T
        if "gate_bias" in p:
            gate, up = gate + p["gate_bias"], up + p["up_bias"]
        return act(gate) * up

    return hidden


def mlp_forward(x: torch.Tensor, p: Mapping[str, torch.Tensor], hidden: Hidden) -> torch.Tensor:
    """D h(x) + b_d."""
    out = hidden(x, p) @ p["down"].T
    return out + p["down_bias"] if "down_bias" in p else out


class MLPForm(TypedDict, total=False):
    """What a family adds to the plain gated MLP D (act(G x) * U x), by keyword: `biases`
    (`gate_bias`, `up_bias`, `down_bias`, fitted with the projections) and `hidden`, its own
    hidden activation in place of act(G x) * (U x) (then act is unused)."""

    biases: Mapping[str, torch.Tensor] | None
    hidden: Hidden | None


def _projections(gate, up, down, biases) -> dict[str, torch.Tensor]:
    return {"gate": gate, "up": up, "down": down, **(biases or {})}


def mlp_error(x, y, gate, up, down, act, **form: Unpack[MLPForm]) -> float:
    """sum_t ||y_t - f(x_t)||^2 / sum_t ||y_t||^2, in chunks of tokens; f(x) = D (act(G x) * U x)
    (with the family's `form`: `mlp_forward`)."""
    p = _projections(gate, up, down, form.get("biases"))
    return _relative_error(x, y, p, form.get("hidden") or gated_hidden(act))


@torch.no_grad()
def _relative_error(x, y, p: Mapping[str, torch.Tensor], hidden: Hidden, chunk: int = 8192) -> float:
    err, total = 0.0, 0.0
    for start in range(0, x.shape[0], chunk):
        xs, ys = x[start : start + chunk], y[start : start + chunk]
        err += float(((ys - mlp_forward(xs, p, hidden)) ** 2).sum(dtype=torch.float64))
        total += float((ys * ys).sum(dtype=torch.float64))
    return err / max(total, 1e-30)


@torch.no_grad()
def _step_scales(x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Each parameter's Adam step size over lr: the RMS of its start for a matrix, of what it is
    added to for a bias (the gate / up pre-activation, the output y), so a zero bias moves too."""
    sample = x[:8192]

    def rms(t: torch.Tensor) -> float:
        return max(float(t.pow(2).mean().sqrt()), 1e-12)

    added = {"gate_bias": lambda: sample @ start["gate"].T, "up_bias": lambda: sample @ start["up"].T}
    added["down_bias"] = lambda: y[:8192]
    return {name: rms(added[name]() if name in added else t) for name, t in start.items()}


def fit_mlp(x, y, gate, up, down, act, settings: FitSettings, **form: Unpack[MLPForm]) -> MLPFit:
    """Adam fit of gate [I, H], up [I, H], down [H, I] (and the `form`'s biases, fitted with
    them) to y [N, H] on x [N, H], from the given start; the best step by held-out error (see
    the module docstring). act is the activation of act(G x) * (U x), unless the `form` gives
    the family's own `hidden`.

    Tokens are split at random (`settings.seed`) into a held-out part (`holdout` of
    them, at least one) and the rest; minibatches of `batch_tokens` are drawn from
    the rest without replacement, epoch after epoch. Float32 on x's device.
    """
    n = x.shape[0]
    generator = torch.Generator().manual_seed(settings.seed)
    start = {k: t.detach().float().clone() for k, t in _projections(gate, up, down, form.get("biases")).items()}
    hidden = form.get("hidden") or gated_hidden(act)
    if n < 2:
        raise ValueError(f"fit_mlp needs at least 2 tokens, got {n}")
    held = min(max(1, round(settings.holdout * n)), n - 1)
    order = torch.randperm(n, generator=generator).to(x.device)
    x_hold, y_hold = x[order[:held]].float(), y[order[:held]].float()
    x_train, y_train = x[order[held:]].float(), y[order[held:]].float()

    def error(p: Mapping[str, torch.Tensor]) -> float:
        return _relative_error(x_hold, y_hold, p, hidden)

    start_error = error(start)
    best, best_error, best_step = _adam_fit(x_train, y_train, start, hidden, settings, generator, error, start_error)
    gate, up, down = (best.pop(k) for k in ("gate", "up", "down"))
    return MLPFit(
        gate,
        up,
        down,
        start_error=start_error,
        best_error=best_error,
        best_step=best_step,
        holdout_tokens=held,
        biases=best,
    )


def _adam_fit(x_train, y_train, start, hidden, settings, generator, error, start_error):
    """The fit's steps: (the best parameters, their held-out error, their step; 0 for the start)."""
    best_error, best_step = start_error, 0
    best = {k: t.clone() for k, t in start.items()}
    params = {k: t.clone().requires_grad_(True) for k, t in start.items()}
    steps = _step_scales(x_train, y_train, start)
    groups = [{"params": [p], "lr": settings.lr * steps[k]} for k, p in params.items()]
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
        pick, queue = queue[:batch].to(x_train.device), queue[batch:]
        residual = y_train[pick] - mlp_forward(x_train[pick], params, hidden)
        loss = residual.pow(2).sum(dim=1).mean() / scale
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        now = error({k: p.detach() for k, p in params.items()})
        if now < best_error:  # NaN and inf never win
            best_error, best_step = now, step
            best = {k: p.detach().clone() for k, p in params.items()}
    return best, best_error, best_step
