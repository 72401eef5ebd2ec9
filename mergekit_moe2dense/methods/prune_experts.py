# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`prune_experts`: a smaller MoE that keeps the N best experts of every layer (REAP).

Per MoE layer, experts are scored on calibration tokens (`score`):

    reap:          S_e = (1/|T_e|) sum_{t in T_e} g_te ||f_e(x_t)||, T_e the tokens routed to e
                   (REAP, Lasby et al. 2025, arXiv:2510.13999: router-weighted expert
                   activation pruning); contribution_sum / selected in the statistics;
    frequency:     |T_e| / N, the fraction of tokens that select e;
    contribution:  (1/N) sum_{t in T_e} g_te ||f_e(x_t)|| over all N tokens (REAP's saliency
                   times the selection frequency).

The N best experts and their router rows (and any other expert-indexed tensor of the
block, e.g. DeepSeek-V3's correction bias) are kept, in their original order; shared
experts are kept as they are. The new MoE routes top-k = min(the model's k, N) of its
N experts (`moe_top_k`). Its router renormalises over the kept experts, so a token
whose top-k experts are all kept is routed exactly as before when the family
renormalises its top-k weights (Mixtral, `norm_topk_prob: true`). `refit: down_proj`
re-fits the kept experts' down projections so that each pruned block's output matches
the original block's on the calibration tokens (outputs/pruned.py).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergekit_moe2dense.methods.base import (
    ExpertMethod,
    MethodError,
    MethodParameters,
    PositiveInt,
    normalize_rows,
)
from mergekit_moe2dense.plan import Align, ExpertGroups, Router, SmallerMoEPlan, single_block_plans

__all__ = ["ExpertGroups", "PruneExperts", "Saliency", "expert_saliency", "smaller_moe_plan"]

Saliency = Literal["reap", "frequency", "contribution"]


def expert_saliency(stats, score: str) -> torch.Tensor:
    """[L, E] float64 per-layer expert scores (higher is better)."""
    if score == "reap":
        return stats.reap_saliency.double()
    if score == "frequency":
        return stats.selection_frequency.double()
    return stats.mean_contribution.double()


def smaller_moe_plan(
    experts: ExpertGroups, layers, *, align: Align = "none", router: Router = "closed_form"
) -> SmallerMoEPlan:
    """The plan of a smaller MoE: `weights` [L, E] is each old expert's share of the new
    experts (1/N for each kept one when pruning)."""
    weights = normalize_rows(experts.weights.sum(0))
    return SmallerMoEPlan(weights, single_block_plans(layers, weights), experts, align=align, router=router)


def check_smaller(params, num_experts: int, top_k: int):
    """`num_experts` in 1..E (default E // 2); `moe_top_k` defaults to min(the model's top-k, N)."""
    if params.num_experts is None:  # REAP's usual cut: half the experts
        params = params.model_copy(update={"num_experts": max(1, num_experts // 2)})
    if params.num_experts > num_experts:
        raise MethodError(f"num_experts={params.num_experts} is out of range: the model has {num_experts} experts")
    if params.moe_top_k is None:
        params = params.model_copy(update={"moe_top_k": min(top_k, params.num_experts)})
    if params.moe_top_k > params.num_experts:
        raise MethodError(
            f"moe_top_k={params.moe_top_k} is out of range: the smaller MoE has {params.num_experts} experts"
        )
    return params


class SmallerMoEParameters(MethodParameters):
    """What every method that writes a smaller MoE takes."""

    num_experts: PositiveInt | None = Field(
        None, description="routed experts per MoE layer of the smaller MoE, N (default: half the model's)"
    )
    moe_top_k: PositiveInt | None = Field(None, description="experts per token (default: the model's, capped at N)")
    # frequency keeps better experts than REAP's saliency on both testbeds (docs/results/prune.md)
    score: Saliency = Field("frequency", description="expert saliency: frequency, reap or contribution")


class PruneExperts(ExpertMethod):
    name = "prune_experts"
    pretty_name = "Pruned experts (REAP)"
    reference_url = "https://arxiv.org/abs/2510.13999"

    Parameters = SmallerMoEParameters

    def complete(self, params, *, num_experts, top_k):
        return check_smaller(params, num_experts, top_k)

    def plan_type(self, params) -> type[SmallerMoEPlan]:
        return SmallerMoEPlan

    def plan(self, stats, params, layers) -> SmallerMoEPlan:
        saliency = expert_saliency(stats, params.score)
        kept = saliency.topk(params.num_experts, dim=-1).indices.tolist()
        return smaller_moe_plan(ExpertGroups.of([[(e,) for e in row] for row in kept], saliency), layers)
