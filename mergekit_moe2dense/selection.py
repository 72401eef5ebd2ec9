# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Expert selection: how many experts each layer keeps, and which ones by diversity.

How many (`spread_budget`). A total of T kept experts is split over the L MoE layers in
proportion to the effective number of experts each layer's router uses,

    n_l = exp(H(p_l)),    p_le = w_le / sum_e w_le,    H(p) = -sum_e p_e log p_e,

w_le the selection frequency of expert e in layer l (n_l = E where every expert is selected
equally often, k where the top-k router always selects the same k experts). Each layer's share is
s_l = clip(c n_l, 1, E), c the scale at which sum_l s_l = T (f(c) = sum_l clip(c n_l, 1, E)
is piecewise linear and non-decreasing in c: solved exactly on the segment where it reaches
T), so a layer held at 1 or E passes what it cannot take to the others in proportion to
theirs. The shares are rounded by largest remainder (Hamilton's method): each layer gets
floor(s_l), and the units left go to the largest fractional parts (ties: the larger n_l,
then the lower layer), so the counts sum to T exactly and stay in 1..E.

Which ones, by diversity: a greedy D-optimal (log-determinant) subset of a Gram matrix.

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

import math
from collections.abc import Sequence

import torch

from mergekit_moe2dense.errors import Moe2DenseError

__all__ = [
    "DIVERSITY_SCORES",
    "TIE_TOLERANCE",
    "SelectionError",
    "diverse_experts",
    "diverse_layer_experts",
    "diverse_layer_selection",
    "diverse_selection",
    "effective_experts",
    "greedy_log_det",
    "log_det",
    "spread_budget",
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


def diverse_layer_experts(
    gram: torch.Tensor, usage: torch.Tensor, counts: Sequence[int], *, weighted: bool
) -> list[list[int]]:
    """counts[l] experts of each layer l by the greedy log-det on `gram` [L, E, E], in the
    order chosen; with `weighted`, on the usage-weighted Gram matrix. `usage` [L, E]
    (selection frequency) picks the first expert and breaks ties."""
    chosen = []
    for layer_gram, layer_usage, count in zip(gram, usage, counts, strict=True):
        matrix = usage_weighted_gram(layer_gram, layer_usage) if weighted else layer_gram
        chosen.append(greedy_log_det(matrix, count, layer_usage))
    return chosen


def diverse_experts(gram: torch.Tensor, usage: torch.Tensor, count: int, *, weighted: bool) -> torch.Tensor:
    """[L, count] experts of each layer (`diverse_layer_experts` with `count` in every layer)."""
    chosen = diverse_layer_experts(gram, usage, [count] * gram.shape[0], weighted=weighted)
    return torch.tensor(chosen, dtype=torch.long).reshape(len(chosen), count)


def diverse_selection(stats, score: str, count: int) -> torch.Tensor:
    """[L, count] experts of each layer for a method's `score` (one of `DIVERSITY_SCORES`),
    from router statistics: their Gram matrices, and selection frequencies as the usage."""
    return diverse_experts(stats.gram, stats.selection_frequency, count, weighted=score == "usage_diversity")


def diverse_layer_selection(stats, score: str, counts: Sequence[int]) -> list[list[int]]:
    """`diverse_selection` with counts[l] experts in layer l."""
    weighted = score == "usage_diversity"
    return diverse_layer_experts(stats.gram, stats.selection_frequency, counts, weighted=weighted)


# -- how many experts each layer keeps ---------------------------------------------------------


def effective_experts(frequency: torch.Tensor) -> torch.Tensor:
    """[L] exp of the entropy of each layer's selection frequencies [L, E] (normalised per
    layer): the number of equally used experts that would route as evenly (1..E)."""
    p = frequency.double().clamp_min(0)
    p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    entropy = -(torch.where(p > 0, p * p.log(), 0.0)).sum(-1)
    return entropy.exp().clamp(1.0, frequency.shape[-1])


def _capped_shares(effective: list[float], total: int, cap: int) -> list[float]:
    """s_l = clip(c n_l, 1, cap) with sum_l s_l = total: f(c) = sum_l clip(c n_l, 1, cap) is
    piecewise linear between the breakpoints 1/n_l and cap/n_l, solved on its segment."""

    def shares(c: float) -> list[float]:
        return [min(max(c * n, 1.0), float(cap)) for n in effective]

    below = 0.0  # f(0) = L <= total
    for point in sorted({1.0 / n for n in effective} | {cap / n for n in effective}):
        reached = sum(shares(point))
        if reached >= total:
            start = sum(shares(below))
            c = point if reached == start else below + (total - start) * (point - below) / (reached - start)
            return shares(c)
        below = point
    return [float(cap)] * len(effective)  # unreachable: f(max breakpoint) = L cap >= total


def spread_budget(frequency: torch.Tensor, total: int) -> list[int]:
    """Kept experts per layer, `total` in all, in proportion to each layer's effective number
    of experts (`effective_experts` of the selection frequencies [L, E]), each in 1..E:
    the capped shares rounded by largest remainder (see the module docstring)."""
    num_layers, cap = frequency.shape
    if not num_layers <= total <= num_layers * cap:
        raise SelectionError(f"cannot keep {total} experts in {num_layers} layers of {cap}")
    effective = effective_experts(frequency).tolist()
    shares = _capped_shares(effective, total, cap)
    counts = [min(max(math.floor(s), 1), cap) for s in shares]
    # remainders equal on paper (1.5 and 4.5) may differ in the last bits: compare them rounded
    order = sorted(range(num_layers), key=lambda i: (-round(shares[i] - counts[i], 9), -effective[i], i))
    left = total - sum(counts)
    for layer in order:
        if left == 0:
            break
        if counts[layer] < cap:
            counts[layer] += 1
            left -= 1
    return counts
