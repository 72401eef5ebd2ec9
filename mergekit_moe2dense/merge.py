# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A layer plan's blocks merged in memory: what the re-fit and the smaller MoE's re-fit start
from, computed as the write graph (graph.py) computes the written tensors.

Projections use the merge kernel (`methods.kernel.weighted_sum`, one expert in memory at a
time); biases and the smaller MoE's in-memory experts the plain sum `mixture`. Blocks are
scaled and concatenated along the intermediate dimension; down biases of several blocks add up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mergekit_moe2dense.families import PROJECTIONS, ExpertSlice
from mergekit_moe2dense.methods.kernel import weighted_sum
from mergekit_moe2dense.plan import LayerPlan, block_dim, block_terms
from mergekit_moe2dense.refit import BIASES

__all__ = ["assemble", "assemble_biases", "mixture"]

Load = Callable[[ExpertSlice], torch.Tensor]


def mixture(load: Load, slices: Sequence[ExpertSlice], weights: Sequence[float]) -> torch.Tensor:
    """sum_e w_e W_e in float32 over the experts of non-zero weight, in order."""
    return sum(w * load(piece).float() for piece, w in zip(slices, weights) if w != 0.0)


def assemble(plan: LayerPlan, load: Load) -> dict[str, torch.Tensor]:
    """The dense projections of `plan` in memory, in float32: per block sum_e w_e W_e
    (`block_terms`; the merge's kernel, one expert in memory at a time), scaled, concatenated."""
    result = {}
    for projection in PROJECTIONS:
        parts = []
        for terms in block_terms(plan, projection):
            part = weighted_sum(lambda e, slices=terms.slices: load(slices[e]), terms.weights).float()
            parts.append(part if terms.scale == 1.0 else part.mul_(terms.scale))
        result[projection] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=block_dim(projection))
    return result


def assemble_biases(plan: LayerPlan, load: Load) -> dict[str, torch.Tensor]:
    """The dense MLP's biases in memory, as graph.projection_task merges them: per block the
    weighted sum of its experts' biases; gate / up biases concatenated, down biases (each
    times its block's down scale) added up. Empty where the experts have no biases."""
    present = [b for b in BIASES if b in plan.layer.experts[0]]
    if present and any(block.shared is not None for block in plan.blocks):
        raise ValueError("expert biases with shared experts are not supported")
    biases = {}
    for projection in present:
        slices = [expert[projection] for expert in plan.layer.experts]
        parts = [mixture(load, slices, block.weights) for block in plan.blocks]
        if projection == "down_bias":
            biases[projection] = sum(part * block.down_scale for part, block in zip(parts, plan.blocks))
        else:
            biases[projection] = torch.cat(parts)
    return biases
