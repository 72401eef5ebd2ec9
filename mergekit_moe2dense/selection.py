# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Expert selection by diversity: a greedy D-optimal (log-determinant) subset of a Gram matrix.

Per MoE layer, the Gram matrix of the experts' outputs on the same calibration tokens

    G_ij = sum_t <f_i(x_t), f_j(x_t)>      (every expert run on each sampled token,
                                            not only the routed ones; uncentred, unweighted)

is recorded in calibration (`RouterStatistics.output_gram`). A set S of experts is diverse
when their outputs span a large volume: det G[S, S] is the squared volume of the
parallelotope of the vectors (f_s(x_1), ..., f_s(x_T)), s in S. Picking the m experts of
largest det G[S, S] is D-optimal design; the greedy

    S_1 = {s_1},    S_{k+1} = S_k + argmax_{e not in S_k} log det G[S_k + e, S_k + e]

is computed by a pivoted Cholesky factorisation: det G[S + e] = det G[S] * r_e with

    r_e = G_ee - G_eS G_SS^-1 G_Se,

the squared norm of what is left of f_e after projecting it on the chosen experts' span,
so each step takes the expert of largest residual r_e and updates every residual by one
Cholesky row (O(E) per step, O(m E^2) in all). The first expert s_1 is the most used one
(the one with the largest `priority`); ties between residuals (equal within a relative
1e-9), and every step once the chosen experts span all the others (r_e ~ 0), go to the
larger priority, so experts with orthogonal outputs of equal norm are taken in usage order.

`usage_weighted_gram` scales each expert's output by sqrt(w_e), w_e its selection
frequency (G~ = D G D, D = diag(sqrt(w))): the volume then counts how often an expert
is used, so an expert no token selects (w_e = 0) is never taken for its diversity alone.

Source: Kim et al. (KRAFTON) 2026, "Pruning and Distilling Mixture-of-Experts into Dense
Language Models", arXiv:2605.28207 (diversity-aware, D-optimal expert selection, with as
many experts as the model's top-k before distillation). Their exact definition of the
outputs in the Gram matrix (gate-weighted, centred or normalised) was not available to us;
this module follows the plain, uncentred outputs above, and the usage-weighted variant is
our own.
"""

from __future__ import annotations

import torch

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = [
    "DIVERSITY_SCORES",
    "TIE_TOLERANCE",
    "SelectionError",
    "diverse_experts",
    "diverse_selection",
    "greedy_log_det",
    "log_det",
    "usage_weighted_gram",
]

DIVERSITY_SCORES = ("diversity", "usage_diversity")  # the methods' `score` values that select here
TIE_TOLERANCE = 1e-9  # residuals this close (relative to the largest) are equal: priority decides
SPAN_TOLERANCE = 1e-12  # residuals below this fraction of the largest diagonal: in the chosen span


class SelectionError(Moe2DenseError, ValueError):
    """More experts asked for than a layer has."""


def log_det(gram: torch.Tensor, chosen: list[int]) -> float:
    """log det G[S, S] of the chosen experts S (-inf where their outputs are dependent)."""
    index = torch.as_tensor(chosen, dtype=torch.long)
    sign, value = torch.linalg.slogdet(gram.double()[index][:, index])
    return float(value) if float(sign) > 0 else float("-inf")


def usage_weighted_gram(gram: torch.Tensor, usage: torch.Tensor) -> torch.Tensor:
    """G~_ij = sqrt(w_i w_j) G_ij: the Gram matrix of the outputs scaled by sqrt(w_e)."""
    scale = usage.double().clamp_min(0).sqrt()
    return gram.double() * scale[:, None] * scale[None, :]


def _next_expert(residual: torch.Tensor, priority: torch.Tensor, taken: torch.Tensor, spanned: bool) -> int:
    """The free expert of largest residual; among (near-)ties, or once all is spanned, the
    one of largest priority (then the lowest index)."""
    free = ~taken
    if spanned:
        candidates = free
    else:
        best = residual.masked_fill(taken, -torch.inf).max()
        candidates = free & (residual >= best - TIE_TOLERANCE * best.abs())
    order = priority.double().masked_fill(~candidates, -torch.inf)
    return int(order.argmax())


def greedy_log_det(gram: torch.Tensor, count: int, priority: torch.Tensor) -> list[int]:
    """The `count` experts chosen by the greedy log-det (pivoted Cholesky) on `gram` [E, E],
    in the order chosen; the first is the one of largest `priority` [E]."""
    g = gram.double()
    size = g.shape[0]
    if not 1 <= count <= size:
        raise SelectionError(f"cannot choose {count} of {size} experts")
    residual = g.diagonal().clone()
    floor = SPAN_TOLERANCE * float(residual.max().clamp_min(0))
    rows = torch.zeros(count, size, dtype=torch.float64)  # the Cholesky rows of the chosen experts
    taken = torch.zeros(size, dtype=torch.bool)
    chosen: list[int] = []
    for step in range(count):
        if step == 0:
            pick = int(priority.double().argmax())
        else:
            spanned = float(residual.masked_fill(taken, -torch.inf).max()) <= floor
            pick = _next_expert(residual, priority, taken, spanned)
        chosen.append(pick)
        taken[pick] = True
        pivot = float(residual[pick])
        if pivot > floor:  # a new direction: project it out of every other expert's output
            rows[step] = (g[pick] - rows[:step].T @ rows[:step, pick]) / pivot**0.5
            residual = (residual - rows[step] ** 2).clamp_min(0)
    return chosen


def diverse_experts(gram: torch.Tensor, usage: torch.Tensor, count: int, *, weighted: bool) -> torch.Tensor:
    """[L, count] experts of each layer by the greedy log-det on `gram` [L, E, E], in the
    order chosen; with `weighted`, on the usage-weighted Gram matrix. `usage` [L, E]
    (selection frequency) picks the first expert and breaks ties."""
    chosen = []
    for layer_gram, layer_usage in zip(gram, usage):
        matrix = usage_weighted_gram(layer_gram, layer_usage) if weighted else layer_gram
        chosen.append(greedy_log_det(matrix, count, layer_usage))
    return torch.tensor(chosen, dtype=torch.long).reshape(len(chosen), count)


def diverse_selection(stats, score: str, count: int) -> torch.Tensor:
    """[L, count] experts of each layer for a method's `score` (one of `DIVERSITY_SCORES`),
    from router statistics: their Gram matrices, and selection frequencies as the usage."""
    return diverse_experts(stats.gram, stats.selection_frequency, count, weighted=score == "usage_diversity")
