# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`concat` and `max_contribution`: keep whole experts instead of averaging them.

Per layer, experts are scored on calibration tokens by

    contribution:  c_e = mean_t g_te ||f_e(x_t)||   (g_te the model's top-k gate
                   weight, zero when e is not selected: REAP's saliency,
                   arXiv:2510.13999, recorded during calibration)
    frequency:     the fraction of tokens that select e.

`concat` keeps the m best experts and places them side by side along the
intermediate dimension, each down projection scaled by its mean gate weight
gbar_e = mean_t g_te (`gates: mean`) or by 1/m (`gates: equal`). The result is

    y = sum_e s_e f_e(x),

which is exactly the MoE with its router replaced by the fixed gates s_e (not
an approximation); the dense intermediate size is m x the expert's.

`max_contribution` is `concat` with m = 1 followed by a re-fit of the down
projection to the MoE's output (`refit: scale` by default; see refit.py).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field
from typing_extensions import Annotated

from mergekit_moe2dense.methods.base import ExpertMergeMethod, check_top_k, normalize_rows, parameter
from mergekit_moe2dense.plan import Block, LayerPlan

Score = Literal["contribution", "frequency"]


def expert_scores(stats, score: str) -> torch.Tensor:
    """[L, E] per-layer expert scores (higher is better)."""
    return stats.mean_contribution if score == "contribution" else stats.selection_frequency


def top_experts(stats, score: str, m: int) -> torch.Tensor:
    """[L, m] indices of the m best experts of each layer, best first."""
    return expert_scores(stats, score).topk(m, dim=-1).indices


class Concat(ExpertMergeMethod):
    name = "concat"
    pretty_name = "Concatenated top experts"
    reference_url = "https://arxiv.org/abs/2510.13999"
    parameters = (
        parameter("num_experts", Optional[Annotated[int, Field(ge=1)]], None, "experts kept per layer, m (default: the model's top-k)"),
        parameter("score", Score, "contribution", "how experts are ranked"),
        parameter("gates", Literal["mean", "equal"], "mean", "down projection scale: mean gate weight, or 1/m"),
    )

    def check_parameters(self, params, *, num_experts, top_k):
        check_top_k(params, num_experts=num_experts, top_k=top_k, key="num_experts")

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        """The kept experts' fixed gates, normalised (what the weights file reports)."""
        kept = top_experts(stats, params["score"], params["num_experts"])
        gates = self._gates(stats, params, kept)
        weights = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        weights.scatter_(1, kept, gates.clamp_min(1e-12))
        return normalize_rows(weights)

    def layer_plans(self, layers, weights, stats, params):
        kept = top_experts(stats, params["score"], params["num_experts"])
        gates = self._gates(stats, params, kept)
        plans = []
        for layer, experts, scales in zip(layers, kept.tolist(), gates.tolist()):
            blocks = []
            for expert, scale in zip(experts, scales):
                one_hot = [0.0] * layer.num_experts
                one_hot[expert] = 1.0
                blocks.append(Block(tuple(one_hot), down_scale=scale))
            plans.append(LayerPlan(layer, tuple(blocks)))
        return plans

    @staticmethod
    def _gates(stats, params, kept: torch.Tensor) -> torch.Tensor:
        if params["gates"] == "equal":
            return torch.full(kept.shape, 1.0 / kept.shape[1], dtype=torch.float64)
        return stats.mean_gate.gather(1, kept)


class MaxContribution(Concat):
    name = "max_contribution"
    pretty_name = "Most contributing expert, re-fitted"
    default_refit = "scale"
    parameters = (parameter("score", Score, "contribution", "how experts are ranked"),)

    def check_parameters(self, params, *, num_experts, top_k):
        params.update(num_experts=1, gates="mean")
