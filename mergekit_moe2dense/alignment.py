# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Aligning experts' hidden units before they are averaged (weight and activation matching).

An expert down(act(gate x) * up x) computes the same function whatever the order of
its hidden units: unit i is (gate row i, up row i, down column i), and permuting the
units permutes these three together. Two experts trained from one start keep their
units in the same order (sparse upcycling); experts trained apart may hold similar
units in different places (Git Re-Basin, Ainsworth et al. 2022, arXiv:2209.04836),
and averaging them unit by unit mixes unrelated units. Before merging, each expert's
units are permuted to best match a reference expert's, by the Hungarian algorithm
(scipy's `linear_sum_assignment`) on

- `weights`: the inner products of unit vectors [gate[i, :] | up[i, :] | down[:, i]]
  (the permutation P minimising ||W_ref - P W||_F over the three projections: Git
  Re-Basin's weight matching for one hidden layer);
- `activations`: the correlations of the units' activations h_i = act(g_i x) (u_i x)
  over calibration tokens x (Git Re-Basin's activation matching; ZipIt!, REAM).

The permutation is written into the experts' `ExpertSlice.units`, so the merge graph,
the reader and the re-fit all see the permuted expert; nothing else changes.

Alignment lowers the error of averaging experts that are already alike (a group of
experts that compute similar functions, `merge_experts`). It does not make experts
trained from scratch averageable as a whole: measured in docs/results/prune.md.

Matching is cubic in the expert width (an [I, I] assignment per expert): seconds at
I = 1024, minutes at I = 14336.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch
from scipy.optimize import linear_sum_assignment

from mergekit_moe2dense.families import ExpertSlice, MoELayer

__all__ = [
    "ALIGN_MODES",
    "activation_permutation",
    "align_layer",
    "expert_intermediate",
    "match_units",
    "permute_expert",
    "permuted_slices",
    "unit_vectors",
    "weight_permutation",
]

ALIGN_MODES = ("none", "weights", "activations")


def unit_vectors(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
    """[I, 3H]: hidden unit i of an expert is (gate[i, :], up[i, :], down[:, i]), unit-normalised
    unless `normalize` is false.

    A permutation of the hidden units permutes these rows and leaves the expert's
    function unchanged, so matching rows is matching units.
    """
    units = torch.cat([gate, up, down.T], dim=1).float()  # float32: [I, 3H] per expert adds up
    if not normalize:
        return units
    return units / units.norm(dim=1, keepdim=True).clamp_min(1e-30)


def match_units(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation p [I] maximising sum_i similarity[i, p[i]] (Hungarian algorithm):
    unit p[i] of the expert is matched to unit i of the reference."""
    rows, cols = linear_sum_assignment(similarity.double().cpu().numpy(), maximize=True)
    permutation = torch.empty(len(rows), dtype=torch.long)
    permutation[torch.as_tensor(rows)] = torch.as_tensor(cols)
    return permutation


def weight_permutation(reference: dict[str, torch.Tensor], expert: dict[str, torch.Tensor]) -> torch.Tensor:
    """The permutation of `expert`'s units ({gate, up, down} weights) that best matches `reference`'s."""
    a = unit_vectors(reference["gate"], reference["up"], reference["down"], normalize=False).double()
    b = unit_vectors(expert["gate"], expert["up"], expert["down"], normalize=False).double()
    return match_units(a @ b.T)


def expert_intermediate(expert: dict[str, torch.Tensor], inputs: torch.Tensor, act: Callable) -> torch.Tensor:
    """h = act(x G^T) * (x U^T) [N, I] of one expert on tokens [N, H], in float32."""
    x = inputs.float()
    return act(x @ expert["gate"].float().T) * (x @ expert["up"].float().T)


def activation_permutation(reference: torch.Tensor, activations: torch.Tensor) -> torch.Tensor:
    """The permutation of the units of `activations` [N, I] whose correlation with the
    reference's [N, I] units is largest in total."""
    a = _standardise(reference.double())
    b = _standardise(activations.double())
    return match_units(a.T @ b / a.shape[0])


def _standardise(h: torch.Tensor) -> torch.Tensor:
    centred = h - h.mean(0, keepdim=True)
    return centred / centred.norm(dim=0, keepdim=True).clamp_min(1e-12) * h.shape[0] ** 0.5


def permute_expert(expert: dict[str, torch.Tensor], permutation: torch.Tensor) -> dict[str, torch.Tensor]:
    """An expert's weights with its hidden units reordered: unit i <- unit permutation[i]."""
    return {
        "gate": expert["gate"][permutation],
        "up": expert["up"][permutation],
        "down": expert["down"][:, permutation],
    }


def permuted_slices(slices: dict[str, ExpertSlice], permutation: torch.Tensor) -> dict[str, ExpertSlice]:
    """An expert's checkpoint slices, read with its hidden units reordered (`ExpertSlice.units`)."""
    units = tuple(int(u) for u in permutation.tolist())
    permuted = {p: replace(piece, units=units, unit_dim=int(p == "down")) for p, piece in slices.items()}
    if "down_bias" in slices:  # [H] (GPT-OSS): no hidden units, as stored
        permuted["down_bias"] = slices["down_bias"]
    return permuted


def align_layer(
    layer: MoELayer,
    groups: Sequence[Sequence[int]],
    load: Callable[[ExpertSlice], torch.Tensor],
    mode: str,
    *,
    inputs: torch.Tensor | None = None,
    act: Callable | None = None,
) -> MoELayer:
    """`layer` with every group member's units permuted to its group's first member (the
    reference). `mode`: `weights`, or `activations` on `inputs` [N, H] (block inputs of
    calibration tokens) through `act`. Groups of one expert, and `none`, change nothing."""
    if mode not in ALIGN_MODES:
        raise ValueError(f"unknown alignment {mode!r}")
    if mode == "none":
        return layer
    if mode == "activations" and (inputs is None or inputs.shape[0] == 0 or act is None):
        raise ValueError("activation alignment needs calibration inputs and the experts' activation")
    experts = list(layer.experts)
    for group in groups:
        if len(group) < 2:
            continue
        reference = _weights(layer.experts[group[0]], load)
        ref_h = expert_intermediate(reference, inputs, act) if mode == "activations" else None
        for member in group[1:]:
            weights = _weights(layer.experts[member], load)
            if mode == "weights":
                permutation = weight_permutation(reference, weights)
            else:
                permutation = activation_permutation(ref_h, expert_intermediate(weights, inputs, act))
            experts[member] = permuted_slices(layer.experts[member], permutation)
    return replace(layer, experts=tuple(experts))


def _weights(slices: dict[str, ExpertSlice], load) -> dict[str, torch.Tensor]:
    return {projection: load(piece).float() for projection, piece in slices.items()}
