# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A layer plan's blocks merged: the one definition of how a dense projection is made from
its blocks, used in memory by the re-fit and the smaller MoE's re-fit, and by the write graph
(graph/builders.py, graph/tasks.py) for the tensors it writes.

`merge_terms` lists each block's experts, weights and scale; `join_blocks` scales the merged
blocks and concatenates them along the intermediate dimension (down biases of several blocks
add up). Projections are summed with the merge kernel (`methods.kernel.weighted_sum`, one
expert in memory at a time); biases and the smaller MoE's in-memory experts with the plain
sum `mixture`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch

from mergekit_moe2dense.families import PROJECTIONS, ExpertSlice
from mergekit_moe2dense.methods.kernel import weighted_sum
from mergekit_moe2dense.plan import BlockTerms, LayerPlan, block_dim, block_terms
from mergekit_moe2dense.refit import BIASES

__all__ = ["assemble", "assemble_biases", "block_scale", "join_blocks", "merge_terms", "mixture"]

Load = Callable[[ExpertSlice], torch.Tensor]


def mixture(load: Load, slices: Sequence[ExpertSlice], weights: Sequence[float]) -> torch.Tensor:
    """sum_e w_e W_e in float32 over the experts of non-zero weight, in order."""
    return sum(w * load(piece).float() for piece, w in zip(slices, weights) if w != 0.0)


def block_scale(block, projection: str) -> float:
    """A block's factor on one projection: `down_scale` on its output (down and its bias),
    `input_scale` on its input (gate and up rows; not their biases)."""
    if projection in ("down", "down_bias"):
        return block.down_scale
    return block.input_scale if projection in ("gate", "up") else 1.0


def merge_terms(plan: LayerPlan, projection: str) -> list[BlockTerms]:
    """Each block's terms of one projection or expert bias (`plan.block_terms`: the experts of
    non-zero weight, in order), with the block's factor on it (`block_scale`)."""
    if projection in BIASES:
        _refuse_shared_biases(plan)
    return [
        dataclasses.replace(terms, scale=block_scale(block, projection))
        for terms, block in zip(block_terms(plan, projection), plan.blocks)
    ]


def join_blocks(parts: Sequence[torch.Tensor], scales: Sequence[float], projection: str) -> torch.Tensor:
    """The blocks' merged tensors, each times its scale, side by side along the intermediate
    dimension; down biases summed instead (each block adds its output)."""
    if projection == "down_bias":
        return sum(part * scale for part, scale in zip(parts, scales))
    scaled = [part * scale if scale != 1.0 else part for part, scale in zip(parts, scales)]
    return scaled[0] if len(scaled) == 1 else torch.cat(scaled, dim=block_dim(projection))


def assemble(plan: LayerPlan, load: Load) -> dict[str, torch.Tensor]:
    """The dense projections of `plan` in memory, in float32: per block sum_e w_e W_e
    (`block_terms`; the merge's kernel, one expert in memory at a time), joined (`join_blocks`)."""
    result = {}
    for projection in PROJECTIONS:
        terms = block_terms(plan, projection)
        parts = [weighted_sum(lambda e, slices=t.slices: load(slices[e]), t.weights).float() for t in terms]
        result[projection] = join_blocks(parts, [t.scale for t in terms], projection)
    return result


def assemble_biases(plan: LayerPlan, load: Load) -> dict[str, torch.Tensor]:
    """The dense MLP's biases in memory, as the write graph merges them: per block the
    weighted sum of its experts' biases; gate / up biases concatenated, down biases (each
    times its block's down scale) added up. Empty where the experts have no biases."""
    present = [b for b in BIASES if b in plan.layer.experts[0]]
    if present:
        _refuse_shared_biases(plan)
    biases = {}
    for projection in present:
        slices = [expert[projection] for expert in plan.layer.experts]
        parts = [mixture(load, slices, block.weights) for block in plan.blocks]
        biases[projection] = join_blocks(parts, [block_scale(b, projection) for b in plan.blocks], projection)
    return biases


def _refuse_shared_biases(plan: LayerPlan) -> None:
    if any(block.shared is not None for block in plan.blocks):
        raise ValueError("expert biases with shared experts are not supported")
