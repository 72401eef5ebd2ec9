# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""`top_k_tempered`: tempered, top-k masked router probabilities, aggregated per layer.

The variant from arcee-ai/mergekit#267 that beat every single expert on a small
Mixtral. For every calibration token t (the recorded subsample):

    p_t = softmax(logits_t / T);  keep the k largest, zero the rest;
    optionally renormalise the kept k to sum to 1;
    w = aggregate_t p_t  (mean or median over tokens), normalised to sum to 1.

Median caveat: after the mask an expert chosen by fewer than half the tokens has
median 0, and every expert can have median 0 (e.g. 8 experts, top-2, balanced
routing). Where a layer's medians are all zero the method falls back to the mean
for that layer, which is never all-zero, and logs a warning naming those layers.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from pydantic import Field

from mergekit_moe2dense.methods.base import (
    ALIGN_DESCRIPTION,
    Align,
    MethodError,
    MethodParameters,
    PositiveInt,
    Temperature,
    WeightedMerge,
    model_top_k,
    normalize_rows,
)

LOG = logging.getLogger(__name__)


def tempered_top_k(logits: torch.Tensor, temperature: float, top_k: int, renormalize: bool) -> torch.Tensor:
    """Per-token masked probabilities [..., T, E] with exactly k non-zero entries per token."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    kept = torch.zeros_like(probs).scatter_(-1, probs.topk(top_k, dim=-1).indices, 1.0)
    probs = probs * kept
    if renormalize:
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class TopKTempered(WeightedMerge):
    name = "top_k_tempered"
    pretty_name = "Tempered top-k router merge"
    reference_url = "https://github.com/arcee-ai/mergekit/issues/267"

    class Parameters(MethodParameters):
        temperature: Temperature = Field(0.5, description="softmax temperature before the mask")
        top_k: PositiveInt | None = Field(None, description="experts kept per token (default: the model's)")
        renormalize: bool = Field(True, description="renormalise the kept k probabilities per token")
        aggregate: Literal["mean", "median"] = Field("mean", description="how tokens are aggregated per layer")
        align: Align = Field("none", description=ALIGN_DESCRIPTION)

    def complete(self, params, *, num_experts, top_k):
        return model_top_k(params, "top_k", num_experts=num_experts, top_k=top_k)

    def alignment(self, params):
        return params.align

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        if stats.samples.shape[1] == 0:
            raise MethodError("top_k_tempered needs per-token samples; the statistics have none")
        probs = tempered_top_k(stats.samples, params.temperature, params.top_k, params.renormalize)
        weights = probs.mean(dim=1)
        if params.aggregate == "median":
            median = probs.median(dim=1).values
            empty = median.sum(-1) <= 0
            if bool(empty.any()):
                LOG.warning(
                    "top_k_tempered: median is zero for every expert in layer(s) %s; using the mean there",
                    [stats.layers[i] for i in empty.nonzero().flatten().tolist()],
                )
            weights = torch.where(empty[:, None], weights, median)
        return normalize_rows(weights)
