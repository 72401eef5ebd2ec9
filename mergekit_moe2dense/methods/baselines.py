# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Baselines every learnt weighting must beat.

`expert_uniform`: the plain average of a layer's experts, w_e = 1/E.
`single_expert`: one expert per layer: a fixed index, or by default the one the
router selects most often on calibration data.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from mergekit_moe2dense.methods.base import (
    ALIGN_DESCRIPTION,
    Align,
    MethodError,
    MethodParameters,
    WeightedMerge,
    one_hot_rows,
)


class ExpertUniform(WeightedMerge):
    name = "expert_uniform"
    pretty_name = "Uniform expert average"

    class Parameters(MethodParameters):
        align: Align = Field("none", description=ALIGN_DESCRIPTION)

    def alignment(self, params):
        return params.align

    def needs_statistics(self, params):
        return params.align == "activations"

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        return torch.full((num_layers, num_experts), 1.0 / num_experts, dtype=torch.float64)


class SingleExpert(WeightedMerge):
    name = "single_expert"
    pretty_name = "Single expert"

    class Parameters(MethodParameters):
        expert: Annotated[int, Field(ge=0)] | None = Field(
            None, description="expert index (default: the most selected per layer)"
        )

    def complete(self, params, *, num_experts, top_k):
        if params.expert is not None and params.expert >= num_experts:
            raise MethodError(f"expert={params.expert} is out of range: the model has {num_experts} experts")
        return params

    def needs_statistics(self, params):
        return params.expert is None

    def layer_weights(self, stats, params, *, num_layers, num_experts):
        if params.expert is not None:
            return one_hot_rows([params.expert] * num_layers, num_experts)
        return one_hot_rows(stats.selection_frequency.argmax(-1).tolist(), num_experts)
