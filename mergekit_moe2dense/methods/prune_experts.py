# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`prune_experts`: a smaller MoE that keeps the N best experts of every layer (REAP).

Per MoE layer, experts are scored on calibration tokens (`score`):

    reap:          S_e = (1/|T_e|) sum_{t in T_e} g_te ||f_e(x_t)||, T_e the tokens routed to e
                   (REAP, Lasby et al. 2025, arXiv:2510.13999: router-weighted expert
                   activation pruning); contribution_sum / selected in the statistics;
    frequency:     |T_e| / N, the fraction of tokens that select e;
    contribution:  (1/N) sum_{t in T_e} g_te ||f_e(x_t)|| over all N tokens (REAP's saliency
                   times the selection frequency);
    reap_softmax:  REAP's saliency with g_te the full softmax probability of e instead of the
                   model's top-k gate weight. `reap` above uses the renormalised top-k weight,
                   which equals Cerebras' reference with `renormalize_router_weights=True`;
                   their default is this one;
    diversity:     the N experts of the greedy log-determinant of the Gram matrix of their
                   outputs on sampled calibration tokens (selection.py, arXiv:2605.28207);
                   `usage_diversity` on the outputs scaled by sqrt(selection frequency).
                   A kept expert's saliency (its share in `merge_experts`) is then its
                   selection frequency.

`reap_softmax` and the diversity scores need what calibration records only on request
(`needs_expert_outputs`): the Gram matrix and the full-softmax sums.

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
from mergekit_moe2dense.selection import DIVERSITY_SCORES, diverse_selection

__all__ = ["ExpertGroups", "PruneExperts", "Saliency", "expert_saliency", "kept_experts", "smaller_moe_plan"]

Saliency = Literal["reap", "frequency", "contribution", "reap_softmax", "diversity", "usage_diversity"]
EXPERT_OUTPUT_SCORES = ("reap_softmax", *DIVERSITY_SCORES)  # need `RouterStatistics.output_gram`


def expert_saliency(stats, score: str) -> torch.Tensor:
    """[L, E] float64 per-layer expert scores (higher is better)."""
    if score == "reap":
        return stats.reap_saliency.double()
    if score == "frequency" or score in DIVERSITY_SCORES:
        return stats.selection_frequency.double()
    if score == "reap_softmax":
        return stats.reap_softmax_saliency.double()
    return stats.mean_contribution.double()


def kept_experts(stats, score: str, count: int) -> list[list[int]]:
    """[L][count] the experts each layer keeps: the `count` most salient, or for a diversity
    score the ones the greedy log-det chooses."""
    if score in DIVERSITY_SCORES:
        return diverse_selection(stats, score, count).tolist()
    return expert_saliency(stats, score).topk(count, dim=-1).indices.tolist()


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
    """What every method that writes a smaller MoE takes. No re-fit by default: on the
    fine-grained testbeds the re-fit on mixed calibration text costs the kept experts their best
    domain (docs/results/fine_grained.md), and without it kept experts stay bit for bit."""

    num_experts: PositiveInt | None = Field(
        None, description="routed experts per MoE layer of the smaller MoE, N (default: half the model's)"
    )
    moe_top_k: PositiveInt | None = Field(None, description="experts per token (default: the model's, capped at N)")
    # REAP's saliency keeps better experts than frequency on the testbeds whose MoE clearly beats
    # its twin (1.6-2.6x less perplexity lost on scratch-hard and fine-qwen3); frequency is ahead
    # by 1.5-4.4% on the small example and scratch (docs/results/fine_grained.md, prune.md)
    score: Saliency = Field(
        "reap",
        description="expert saliency: frequency, reap, contribution, reap_softmax, diversity or usage_diversity",
    )


class PruneExperts(ExpertMethod):
    name = "prune_experts"
    pretty_name = "Pruned experts (REAP)"
    reference_url = "https://arxiv.org/abs/2510.13999"

    Parameters = SmallerMoEParameters

    def complete(self, params, *, num_experts, top_k):
        return check_smaller(params, num_experts, top_k)

    def needs_expert_outputs(self, params) -> bool:
        return params.score in EXPERT_OUTPUT_SCORES

    def plan_type(self, params) -> type[SmallerMoEPlan]:
        return SmallerMoEPlan

    def plan(self, stats, params, layers) -> SmallerMoEPlan:
        saliency = expert_saliency(stats, params.score)
        kept = kept_experts(stats, params.score, params.num_experts)
        return smaller_moe_plan(ExpertGroups.of([[(e,) for e in row] for row in kept], saliency), layers)
