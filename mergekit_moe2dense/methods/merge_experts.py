# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`merge_experts`: a smaller MoE whose N experts each merge a group of the old ones (HC-SMoE).

Per MoE layer the E experts are split into N groups by agglomerative clustering with
average linkage (HC-SMoE, Chen et al. 2024, arXiv:2410.08589), on the similarity of

    grouping: outputs   the experts' outputs f_e(x) on the sampled calibration tokens
                        (cosine of the concatenated [tokens x H] outputs, accumulated as
                        an E x E Gram matrix; the tokens are the router inputs recorded
                        in calibration, `max_token_samples` of them);
    grouping: router    the experts' router logits on the sampled tokens (correlation).

Each group's members are aligned to its most salient member (`align`: none, weights or
activations; alignment.py), then merged with weights proportional to their saliency
(`score`, as `prune_experts`; `reap_softmax` is REAP's saliency with the full softmax
probability; the diversity scores, which choose a set rather than weigh members, are
`prune_experts`' and `concat`'s only). The new router row is the same mix of
the members' rows (the closed form of reassemble.py: the merged expert's logit is the
saliency-weighted mean of its members'), or, with `router: fitted`, a multinomial logistic
regression of each sampled token's group (the group of its top-1 expert in the MoE) on its
router input (`reassemble.fitted_router`, as `kmeans_multi_dense`). A group of one is that
expert, kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator
from transformers.activations import ACT2FN

from mergekit_moe2dense.alignment import expert_intermediate
from mergekit_moe2dense.families import PROJECTIONS
from mergekit_moe2dense.methods.base import ExpertMethod, MethodError
from mergekit_moe2dense.methods.prune_experts import (
    EXPERT_OUTPUT_SCORES,
    Saliency,
    SmallerMoEParameters,
    check_smaller,
    expert_saliency,
    smaller_moe_plan,
)
from mergekit_moe2dense.plan import Align, ExpertGroups, SmallerMoEPlan
from mergekit_moe2dense.selection import DIVERSITY_SCORES

__all__ = ["MergeExperts", "agglomerate", "group_labels", "output_similarity", "router_similarity"]

CHUNK = 1024  # sampled tokens per batch of expert outputs


def agglomerate(similarity: torch.Tensor, num_groups: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering of E items into exactly `num_groups` groups:
    repeatedly join the two groups whose mean pairwise similarity is highest (ties: lowest
    indices). The linkage of a joined group is updated in place (Lance-Williams: the
    size-weighted mean of its parts'), so each join costs O(E)."""
    linkage = similarity.double().clone()
    count = linkage.shape[0]
    linkage.fill_diagonal_(-torch.inf)
    sizes = torch.ones(count, dtype=torch.float64)
    groups: list[list[int] | None] = [[e] for e in range(count)]
    for _ in range(count - num_groups):
        a, b = divmod(int(linkage.argmax()), count)
        a, b = min(a, b), max(a, b)
        joined = (sizes[a] * linkage[a] + sizes[b] * linkage[b]) / (sizes[a] + sizes[b])
        linkage[a], linkage[:, a] = joined, joined
        linkage[a, a] = -torch.inf
        linkage[b], linkage[:, b] = -torch.inf, -torch.inf
        sizes[a] += sizes[b]
        groups[a], groups[b] = sorted(groups[a] + groups[b]), None
    return [group for group in groups if group is not None]


def group_labels(logits: torch.Tensor, groups: Sequence[Sequence[int]]):
    """[N] numpy: the group of each sampled token's top-1 expert (logits [N, E])."""
    of_expert = torch.empty(logits.shape[1], dtype=torch.long)
    for j, group in enumerate(groups):
        of_expert[list(group)] = j
    return of_expert[logits.argmax(-1)].numpy()


def router_similarity(logits: torch.Tensor) -> torch.Tensor:
    """[E, E] correlation of the experts' router logits over sampled tokens [N, E]."""
    x = logits.double()
    x = x - x.mean(0, keepdim=True)
    x = x / x.norm(dim=0, keepdim=True).clamp_min(1e-12)
    return x.T @ x


def output_similarity(experts: Sequence[dict[str, torch.Tensor]], inputs: torch.Tensor, act) -> torch.Tensor:
    """[E, E] cosine of the experts' outputs f_e(x) = D_e (act(G_e x) * U_e x) on tokens [N, H]."""
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for start in range(0, inputs.shape[0], CHUNK):
        x = inputs[start : start + CHUNK]
        outputs = torch.stack(
            [(expert_intermediate(e, x, act) @ e["down"].float().T).reshape(-1) for e in experts]
        ).double()
        gram += outputs @ outputs.T
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    return gram / norms[:, None] / norms[None, :]


class MergeExperts(ExpertMethod):
    name = "merge_experts"
    pretty_name = "Merged expert groups (HC-SMoE)"
    reference_url = "https://arxiv.org/abs/2410.08589"

    class Parameters(SmallerMoEParameters):
        # the saliency that weights each group's merge, as measured (docs/results/prune.md)
        score: Saliency = Field(
            "frequency",
            description="expert saliency: frequency, reap, contribution, reap_softmax, diversity or usage_diversity",
        )
        grouping: Literal["outputs", "router"] = Field(
            "outputs", description="cluster experts by their outputs on calibration tokens, or by router logits"
        )
        align: Align = Field(
            "weights", description="permute each member's hidden units to its group's reference before merging"
        )
        router: Literal["closed_form", "fitted"] = Field(
            "closed_form",
            description="new router rows: the saliency-weighted mix of the members' rows, or a logistic regression",
        )

        @field_validator("score")
        @classmethod
        def _a_saliency(cls, value):
            # a group's members are weighed by a saliency; a diversity score chooses a set
            if value in DIVERSITY_SCORES:
                raise ValueError(
                    "selects a set of experts (prune_experts, concat); use frequency, reap or reap_softmax"
                )
            return value

    def complete(self, params, *, num_experts, top_k):
        return check_smaller(params, num_experts, top_k)

    def needs_router_inputs(self, params) -> bool:
        return params.grouping == "outputs" or params.align == "activations" or params.router == "fitted"

    def needs_expert_outputs(self, params) -> bool:
        return params.score in EXPERT_OUTPUT_SCORES

    def plan_type(self, params) -> type[SmallerMoEPlan]:
        return SmallerMoEPlan

    def plan(self, stats, params, layers) -> SmallerMoEPlan:
        saliency = expert_saliency(stats, params.score)
        if params.grouping == "outputs":  # needs the experts' weights: `refine`
            keep = saliency.topk(params.num_experts, dim=-1).indices.tolist()
            groups = [[(e,) for e in row] for row in keep]
        else:
            if stats.samples.shape[1] < 2:
                raise MethodError(f"{self.name}: grouping: router needs sampled tokens (calibration.max_token_samples)")
            groups = [agglomerate(router_similarity(stats.samples[p]), params.num_experts) for p in range(len(layers))]
        return smaller_moe_plan(ExpertGroups.of(groups, saliency), layers, align=params.align, router=params.router)

    def refine(self, result, stats, params, source) -> SmallerMoEPlan:
        if params.grouping != "outputs":
            return result
        act = ACT2FN[source.config.hidden_act]
        groups = []
        for position, layer in enumerate(result.layers):
            experts = [{p: source.reader.read_slice(e[p]).float() for p in PROJECTIONS} for e in layer.layer.experts]
            similarity = output_similarity(experts, stats.router_inputs[position], act)
            groups.append(agglomerate(similarity, params.num_experts))
        layers = [plan.layer for plan in result.layers]
        return smaller_moe_plan(
            ExpertGroups.of(groups, result.experts.saliency), layers, align=params.align, router=params.router
        )
