# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`router_weighted`: weight each layer's experts by calibrated router scores.

From the mergekit discussion on merging Mixtral 8x22B into a dense model
(arcee-ai/mergekit#267). Per layer, with an aggregate `a_e` over calibration tokens
and an explicit temperature T:

    mean_logit:          w = softmax(mean_t logit_te / T)
                         (= the normalised geometric mean of the probabilities at T=1)
    mean_prob, median_prob, selection_frequency:
                         w = softmax(log a_e / T)  (proportional to a_e^(1/T))

so T=1 gives the normalised aggregate, T->0 one-hot on the best expert, and large
T the plain average. Then each projection is sum_e w_e W_e.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from mergekit_moe2dense.methods.base import (
    ALIGN_DESCRIPTION,
    Align,
    MethodError,
    MethodParameters,
    Refit,
    Temperature,
    WeightedMerge,
)

Aggregate = Literal["mean_logit", "mean_prob", "median_prob", "selection_frequency"]


def aggregate_scores(stats, aggregate: str) -> torch.Tensor:
    """Per layer and expert, the aggregate in log space for probability-like scores."""
    if aggregate == "mean_logit":
        return stats.mean_logits
    if aggregate == "mean_prob":
        scores = stats.mean_probs
    elif aggregate == "selection_frequency":
        scores = stats.selection_frequency
    else:
        if stats.samples.shape[1] == 0:
            raise MethodError("median_prob needs per-token samples; the statistics have none")
        scores = torch.softmax(stats.samples.double(), dim=-1).median(dim=1).values
    return scores.double().log()


class RouterWeighted(WeightedMerge):
    name = "router_weighted"
    pretty_name = "Router-weighted expert merge"
    reference_url = "https://github.com/arcee-ai/mergekit/issues/267"

    class Parameters(MethodParameters):
        refit: Refit = Field("down_proj", description=MethodParameters.model_fields["refit"].description)
        aggregate: Aggregate = Field("mean_logit", description="how router scores are aggregated over tokens")
        temperature: Temperature = Field(1.0, description="softmax temperature over experts")
        align: Align = Field("none", description=ALIGN_DESCRIPTION)

    def alignment(self, params):
        return params.align

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        scores = aggregate_scores(stats, params.aggregate)
        return torch.softmax(scores / params.temperature, dim=-1)
