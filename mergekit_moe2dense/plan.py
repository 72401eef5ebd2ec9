# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Every plan a method makes, and what the dense MLP of one layer is made of.

A method's `plan()` returns one plan type, and the type says what the conversion
writes (outputs/): `DensePlan` one dense model, `ClusterPlan` k dense models,
`MoEPlan` one MoE of k merged experts, `SmallerMoEPlan` a smaller MoE of kept or
merged expert groups. The finishing stage (finish.py) fills in what the plan's
writer needs beyond the method's decision (family scales, alignment, router rows,
re-fitted tensors), each step returning a new plan.

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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from mergekit_moe2dense.clustering import Decomposition
from mergekit_moe2dense.families import ExpertSlice, MoEFamily, MoELayer

__all__ = [
    "Align",
    "Block",
    "BlockTerms",
    "ClusterPlan",
    "ClusterWeights",
    "DensePlan",
    "ExpertGroups",
    "LayerPlan",
    "MethodPlan",
    "MoEPlan",
    "Router",
    "SmallerMoEPlan",
    "block_dim",
    "block_terms",
    "check_weights",
    "single_block_plans",
    "with_family_scales",
]

Align = Literal["none", "weights", "activations"]
Router = Literal["closed_form", "fitted"]


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


# -- what a method decides for a whole model ------------------------------------------------


def check_weights(weights: torch.Tensor, num_layers: int, num_experts: int) -> None:
    """Every method's contract: [..., L, E], finite, non-negative rows summing to one.

    A violation is a bug in the method, not bad input, hence RuntimeError.
    """
    if weights.dim() < 2 or tuple(weights.shape[-2:]) != (num_layers, num_experts):
        raise RuntimeError(f"method returned weights of shape {tuple(weights.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise RuntimeError("method returned non-finite or negative expert weights")
    sums = weights.sum(-1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=1e-6):
        raise RuntimeError("method returned expert weights that do not sum to 1 per layer")


@dataclass(frozen=True)
class MethodPlan:
    """What a method decided for a whole model, from one pass over the statistics.

    `weights` [L, E] float64 is what expert_weights.json and the model card report;
    `layers` holds one `LayerPlan` per MoE layer (before the family's scales,
    `with_family_scales`). The subclasses say what is written.
    """

    weights: torch.Tensor
    layers: tuple[LayerPlan, ...]

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(self.layers))
        check_weights(self.weights, len(self.layers), self.num_experts)

    @property
    def num_experts(self) -> int:
        return self.layers[0].layer.num_experts if self.layers else self.weights.shape[-1]

    @property
    def reported_weights(self) -> torch.Tensor:
        """The expert weights the library's result reports: [L, E], or [k, L, E]."""
        return self.weights


@dataclass(frozen=True)
class DensePlan(MethodPlan):
    """One dense model. `align` permutes the averaged experts' hidden units (alignment.py);
    the re-fit fills `fitted` (dense tensor name -> value, the projections each `LayerPlan`
    lists in its `fitted`), `refit_errors` (layer -> relative error before, after) and, with
    `refit: fit`, `refit_heldout` (layer -> held-out error at the start, at the end, seconds)."""

    align: Align = "none"
    fitted: Mapping[str, torch.Tensor] = field(default_factory=dict)
    refit_errors: Mapping[int, tuple[float, float]] | None = None
    refit_heldout: Mapping[int, tuple[float, float, float]] = field(default_factory=dict)


@dataclass
class ClusterWeights:
    weights: torch.Tensor  # [k, L, E] float64, rows summing to 1
    decomposition: Decomposition  # labels [L, N], centroids [L, k, E] in feature space

    @property
    def shares(self) -> list:
        return [float(s) for s in self.decomposition.shares]


@dataclass(frozen=True)
class _ClusteredPlan(MethodPlan):
    """What the two outputs of k clusters of calibration tokens share: all k clusters' weights,
    which the result reports."""

    clusters: ClusterWeights

    def __post_init__(self):
        super().__post_init__()
        check_weights(self.clusters.weights, len(self.layers), self.num_experts)

    @property
    def reported_weights(self) -> torch.Tensor:
        return self.clusters.weights


@dataclass(frozen=True)
class ClusterPlan(_ClusteredPlan):
    """k dense models, one per cluster of calibration tokens; `weights` and `layers` are
    cluster 0's, `clusters` all k. `models` holds each cluster's finished layer plans
    (`finish.family_scales`)."""

    models: tuple[tuple[LayerPlan, ...], ...] = ()


@dataclass(frozen=True)
class MoEPlan(_ClusteredPlan):
    """One MoE of the same family with k experts, expert j the merge of cluster j's weights.
    `rows` holds every expert-indexed tensor of every block, by output name (`finish.router_rows`)."""

    router: Router = "closed_form"
    seed: int = 0  # of the fitted router's logistic regression
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class ExpertGroups:
    """The experts of a smaller MoE (`prune_experts`, `merge_experts`).

    Per MoE layer, N groups of the old experts, each group's most salient member first
    (its reference for alignment); new expert j of a layer merges group j with weights
    proportional to the members' saliencies (uniform where they are all zero). Groups
    are numbered by their smallest member, so keeping every expert keeps their order
    (and DeepSeek's expert groups). A kept (pruned-to) expert is a group of one.
    """

    groups: tuple[tuple[tuple[int, ...], ...], ...]  # [L][N] old expert indices, reference first
    saliency: torch.Tensor  # [L, E] float64, non-negative

    @classmethod
    def of(cls, groups: Sequence[Sequence[Sequence[int]]], saliency: torch.Tensor) -> ExpertGroups:
        """Groups in any order: members sorted by saliency (best first), groups by smallest member."""
        ordered = []
        for position, layer in enumerate(groups):
            scores = saliency[position]
            members = [tuple(sorted(g, key=lambda e: (-float(scores[e]), e))) for g in layer]
            ordered.append(tuple(sorted(members, key=min)))
        return cls(tuple(ordered), saliency.double())

    @property
    def num_experts(self) -> int:
        return len(self.groups[0])

    @property
    def weights(self) -> torch.Tensor:
        """[N, L, E] float64: row j of layer l merges group j, rows summing to 1."""
        num_layers, num_old = self.saliency.shape
        weights = torch.zeros(self.num_experts, num_layers, num_old, dtype=torch.float64)
        for position, layer in enumerate(self.groups):
            for j, group in enumerate(layer):
                index = torch.as_tensor(group)
                scores = self.saliency[position, index].clamp_min(0)
                weights[j, position, index] = scores / scores.sum() if float(scores.sum()) > 0 else 1.0 / len(group)
        return weights


@dataclass(frozen=True)
class SmallerMoEPlan(MethodPlan):
    """A smaller MoE of the same family: N kept or merged experts per layer (`experts`);
    `weights` [L, E] is each old expert's share of the new experts. The finishing stage
    fills `moe_layers` (the source's MoE layers, members' slices permuted where aligned),
    `rows` (every expert-indexed block tensor of the new MoE, by output name), and with
    the re-fit `fitted` (down projections by `graph.expert_key`) and `refit_errors`."""

    experts: ExpertGroups
    align: Align = "none"
    router: Router = "closed_form"
    moe_layers: tuple[MoELayer, ...] = ()
    rows: Mapping[str, torch.Tensor] = field(default_factory=dict)
    fitted: Mapping[str, torch.Tensor] = field(default_factory=dict)
    refit_errors: Mapping[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def reported_weights(self) -> torch.Tensor:
        return self.experts.weights
