# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What the dense MLP of one layer is made of, independent of how it is computed.

A dense MLP is a concatenation of *blocks* along its intermediate dimension.
Each block is a linear merge of the layer's routed experts (or one shared
expert), and its down projection is scaled by `down_scale`. Because the MLP is
act(x G^T) * (x U^T) summed through D, concatenating blocks adds their outputs:
one block with weights w is the plain merged expert, standing for the whole
routed mixture; m one-hot blocks each at its expert's own fixed gate
(`Block.fixed_gate`) are the fixed-gate mixture of m experts; a shared expert is
one more block with scale 1 (or its calibrated gate).

A layer's projections can instead come from a re-fit (refit.py): `fitted`
names them, and the graph loads them from the fitted-tensor file rather than
merging experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from mergekit_moe2dense.families import PROJECTIONS, ExpertSlice, MoEFamily, MoELayer


@dataclass(frozen=True)
class Block:
    weights: tuple[float, ...] = ()  # over the routed experts (unused when `shared` is set)
    shared: int | None = None  # index into MoELayer.shared_experts
    down_scale: float = 1.0
    # factor on the block's input, folded into its gate and up rows (Llama 4's router scales
    # the expert's input: E(c x) = D (act(c G x) * (c U x)))
    input_scale: float = 1.0
    # a one-hot block that is routed expert `fixed_gate` alone at its own fixed gate (concat),
    # not a share of the whole routed mixture: the family's `fixed_gate` gives its scales
    fixed_gate: int | None = None


@dataclass(frozen=True)
class LayerPlan:
    layer: MoELayer
    blocks: tuple[Block, ...]
    fitted: tuple[str, ...] = ()  # projections read from the re-fit file instead of merged


def single_block_plans(layers: Sequence[MoELayer], weights: torch.Tensor) -> list:
    """The plain merge: one block per layer with the method's expert weights."""
    return [LayerPlan(layer, (Block(tuple(row)),)) for layer, row in zip(layers, weights.tolist())]


def with_family_scales(plans: Sequence[LayerPlan], family: MoEFamily, config, stats) -> list:
    """What every family adds to a method's plans, in one place.

    Routed blocks stand for a mixture whose weights sum to 1; the family's
    `routed_scale` (the mixture's calibrated total weight, or DeepSeek's
    routed_scaling_factor) multiplies their down projection. Each shared expert
    is appended as one more block, scaled by `shared_scale` (its calibrated gate,
    or 1 where ungated). Where the router scales the experts' input instead (Llama 4),
    `routed_input_scale` multiplies the routed blocks' gate and up rows. A block that
    is one expert at its own fixed gate (`Block.fixed_gate`, concat) stands for that
    expert's part of the mixture only: its scales are the family's `fixed_gate` of the
    expert (its calibrated mean top-k weight, which already holds the routed scale;
    Llama 4: its selection frequency, and its mean score on its input), never also the
    whole mixture's.
    """
    finished = []
    for position, plan in enumerate(plans):
        routed = family.routed_scale(config, stats, position)
        scaled = family.routed_input_scale(config, stats, position)
        blocks = []
        for block in plan.blocks:
            if block.shared is None:
                down, into = routed, scaled
                if block.fixed_gate is not None:
                    down, into = family.fixed_gate(config, stats, position, block.fixed_gate)
                block = replace(block, down_scale=block.down_scale * down, input_scale=block.input_scale * into)
            blocks.append(block)
        blocks = tuple(blocks)
        shared = family.shared_scale(config, stats, position) if plan.layer.shared_experts else 1.0
        blocks += tuple(Block(shared=i, down_scale=shared) for i in range(len(plan.layer.shared_experts)))
        finished.append(LayerPlan(plan.layer, blocks))
    return finished


@dataclass(frozen=True)
class BlockTerms:
    """One block of one projection: sum_i weights[i] * (tensor of slices[i]), times `scale`."""

    slices: tuple[ExpertSlice, ...]  # the contributing experts' slices (zero weights left out)
    experts: tuple[int, ...]  # their indices into MoELayer.experts; () for a shared expert
    weights: tuple[float, ...]
    scale: float  # the block's down_scale for `down`, its input_scale for gate and up
    shared: int | None = None  # index into MoELayer.shared_experts


def block_terms(plan: LayerPlan, projection: str) -> list[BlockTerms]:
    """The terms of each block of `plan`'s `projection`, in block order (the order in which
    the blocks are concatenated, along `block_dim(projection)`)."""
    terms = []
    for block in plan.blocks:
        scale = block.down_scale if projection == "down" else block.input_scale
        if block.shared is not None:
            piece = plan.layer.shared_experts[block.shared][projection]
            terms.append(BlockTerms((piece,), (), (1.0,), scale, shared=block.shared))
            continue
        used = [e for e, w in enumerate(block.weights) if w != 0.0]
        terms.append(
            BlockTerms(
                tuple(plan.layer.experts[e][projection] for e in used),
                tuple(used),
                tuple(float(block.weights[e]) for e in used),
                scale,
            )
        )
    return terms


def block_dim(projection: str) -> int:
    """The intermediate dimension, along which blocks are concatenated: 1 for down [H, I], 0 for gate/up [I, H]."""
    return 1 if projection == "down" else 0


def assemble(plan: LayerPlan, load: Callable[[ExpertSlice], torch.Tensor]) -> dict[str, torch.Tensor]:
    """The dense projections of `plan` in memory, in float32: per block sum_e w_e W_e
    (`block_terms`; the merge's kernel, one expert in memory at a time), scaled, concatenated."""
    from mergekit_moe2dense.methods.kernel import weighted_sum  # the methods import this module

    result = {}
    for projection in PROJECTIONS:
        parts = []
        for terms in block_terms(plan, projection):
            part = weighted_sum(lambda e, slices=terms.slices: load(slices[e]), terms.weights).float()
            parts.append(part if terms.scale == 1.0 else part.mul_(terms.scale))
        result[projection] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=block_dim(projection))
    return result
