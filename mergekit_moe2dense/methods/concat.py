# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`concat` and `max_contribution`: keep whole experts instead of averaging them.

Per layer, experts are scored on calibration tokens by

    contribution:  c_e = (1/N) sum_t g_te ||f_e(x_t)||   over all N calibration
                   tokens, g_te the model's top-k gate weight (zero when e is not
                   selected). This is REAP's saliency (arXiv:2510.13999) times
                   e's selection frequency: REAP averages over the tokens routed
                   to e only, so a rarely chosen expert with large outputs scores
                   higher there than here.
    frequency:     the fraction of tokens that select e.
    diversity:     the m experts of the greedy log-determinant of the Gram matrix of their
                   outputs on sampled calibration tokens, the most used one first (selection.py;
                   DO-ACP, arXiv:2605.28207); `usage_diversity` the same on the Gram matrix
                   of the outputs scaled by sqrt(selection frequency). Both need the Gram
                   matrix, recorded in calibration only when one of them is asked for.

`concat` keeps the m best experts and places them side by side along the
intermediate dimension. With `gates: mean` each is its expert alone at its own
fixed gate (`Block.fixed_gate`; the family says what that is, `MoEFamily.fixed_gate`):
its down projection scaled by its mean gate weight gbar_e = mean_t g_te, the
router's own top-k weight (so a top-k sum that is not 1 and DeepSeek's
routed_scaling_factor are in it once). The result is

    y = sum_e gbar_e f_e(x),

which is exactly the MoE with its router replaced by the fixed gates gbar_e (not
an approximation). Llama 4's router scales the expert's input instead: there each
kept expert is f_e(c_e x) counted with e's selection frequency, c_e its mean
score when chosen. With `gates: equal` each kept expert is 1/m of the whole
routed mixture (times the family's routed scale, like a merged expert). The
dense intermediate size is m x the expert's. The reported expert weights are the
kept experts' gates gbar_e (or 1/m), normalised.

With `budget: spread` the m x L kept experts (L MoE layers) are split over the layers in
proportion to the effective number of experts each router uses, exp of the entropy of the
layer's selection frequencies, each layer keeping 1..E (selection.spread_budget): a layer
whose routing is spread keeps more, one whose routing is concentrated fewer. The dense
target has one intermediate size, the widest layer's; the narrower layers are zero-padded
(graph.PadIntermediate: zero gate/up rows and down columns, which add exactly 0).

`max_contribution` is `concat` with m = 1 followed by a re-fit of the down
projection to the MoE's output. Both re-fit the down projection by default (`refit:
down_proj`; see calibration/refit/): on every testbed it lowers held-out perplexity.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, computed_field

from mergekit_moe2dense.methods.base import (
    ExpertMethod,
    MethodParameters,
    PositiveInt,
    Refit,
    model_top_k,
    normalize_rows,
)
from mergekit_moe2dense.plan import Block, DensePlan, LayerPlan
from mergekit_moe2dense.selection import DIVERSITY_SCORES, diverse_layer_selection, diverse_selection, spread_budget

LOG = logging.getLogger(__name__)

Score = Literal["contribution", "frequency", "diversity", "usage_diversity"]
Budget = Literal["uniform", "spread"]


def expert_scores(stats, score: str) -> torch.Tensor:
    """[L, E] per-layer expert scores (higher is better)."""
    return stats.mean_contribution if score == "contribution" else stats.selection_frequency


def layer_counts(stats, budget: str, m: int, num_layers: int) -> list[int]:
    """Experts kept in each layer: m everywhere (`uniform`), or m x L split by how spread each
    layer's routing is (`spread`, selection.spread_budget)."""
    if budget == "uniform":
        return [m] * num_layers
    return spread_budget(stats.selection_frequency, m * num_layers)


def top_experts(stats, score: str, counts: Sequence[int]) -> list[list[int]]:
    """The counts[l] best experts of each layer l, best first (for a diversity score: in the
    order the greedy chose them)."""
    if len(set(counts)) == 1:  # the same m everywhere: one selection over all layers at once
        m = counts[0]
        if score in DIVERSITY_SCORES:
            return diverse_selection(stats, score, m).tolist()
        return expert_scores(stats, score).topk(m, dim=-1).indices.tolist()
    if score in DIVERSITY_SCORES:
        return diverse_layer_selection(stats, score, counts)
    scores = expert_scores(stats, score)
    return [scores[position].topk(count).indices.tolist() for position, count in enumerate(counts)]


@dataclass(frozen=True)
class Selection:
    """The experts kept in each layer and their fixed gates, one entry per layer (layers may
    keep different numbers of experts, with `budget: spread`)."""

    experts: tuple[tuple[int, ...], ...]  # indices, best first
    gates: tuple[torch.Tensor, ...]  # float64, the kept experts' gates (mean top-k weight, or 1/m): reported weights


class Concat(ExpertMethod):
    name = "concat"
    pretty_name = "Concatenated top experts"
    reference_url = "https://arxiv.org/abs/2510.13999"

    class Parameters(MethodParameters):
        num_experts: PositiveInt | None = Field(
            None, description="experts kept per layer, m (default: the model's top-k)"
        )
        refit: Refit = Field("down_proj", description=MethodParameters.model_fields["refit"].description)
        # every family records contributions; usage_diversity, the best measured and what `inspect`
        # recommends, needs the experts' outputs, which Llama 4's calibration does not record
        score: Score = Field("contribution", description="how experts are ranked")
        gates: Literal["mean", "equal"] = Field("mean", description="down projection scale: mean gate weight, or 1/m")
        budget: Budget = Field(
            "uniform",
            description="how the m x (MoE layers) kept experts are split over the layers: uniform, m in each; "
            "spread, in proportion to exp(entropy) of each layer's selection frequencies, 1..E each "
            "(the model is zero-padded to the widest layer)",
        )

    def complete(self, params, *, num_experts, top_k):
        return model_top_k(params, "num_experts", num_experts=num_experts, top_k=top_k)

    def needs_expert_outputs(self, params) -> bool:
        return params.score in DIVERSITY_SCORES

    def select(self, stats, params, num_layers: int) -> Selection:
        budget = getattr(params, "budget", "uniform")  # max_contribution: one expert everywhere
        counts = layer_counts(stats, budget, params.num_experts, num_layers)
        if budget != "uniform":
            LOG.info("budget: %s: experts kept per MoE layer %s", budget, counts)
        kept = top_experts(stats, params.score, counts)
        gates = []
        for position, experts in enumerate(kept):
            if params.gates == "equal":
                gates.append(torch.full((len(experts),), 1.0 / len(experts), dtype=torch.float64))
            else:
                gates.append(stats.mean_gate[position, experts].double())
        return Selection(tuple(tuple(experts) for experts in kept), tuple(gates))

    def plan(self, stats, params, layers) -> DensePlan:
        selection = self.select(stats, params, len(layers))
        weights = torch.zeros(len(layers), layers[0].num_experts, dtype=torch.float64)
        plans = []
        equal = params.gates == "equal"
        for position, (layer, experts) in enumerate(zip(layers, selection.experts)):
            weights[position, list(experts)] = selection.gates[position].clamp_min(1e-12)
            blocks = []
            for expert in experts:
                one_hot = [0.0] * layer.num_experts
                one_hot[expert] = 1.0
                if equal:  # 1/m of the whole mixture: the family's scales apply as to a merged expert
                    blocks.append(Block(tuple(one_hot), down_scale=1.0 / len(experts)))
                else:  # the expert at its own calibrated gate (plan.with_family_scales: MoEFamily.fixed_gate)
                    blocks.append(Block(tuple(one_hot), fixed_gate=expert))
            plans.append(LayerPlan(layer, tuple(blocks)))
        return DensePlan(normalize_rows(weights), plans)


class MaxContribution(Concat):
    name = "max_contribution"
    pretty_name = "Most contributing expert, re-fitted"

    class Parameters(MethodParameters):
        refit: Refit = Field("down_proj", description=MethodParameters.model_fields["refit"].description)
        score: Score = Field("contribution", description="how experts are ranked")

        # Fixed by the method, not settable; recorded with the parameters.
        @computed_field
        @property
        def num_experts(self) -> int:
            return 1

        @computed_field
        @property
        def gates(self) -> str:
            return "mean"

    def complete(self, params, *, num_experts, top_k):
        return params
