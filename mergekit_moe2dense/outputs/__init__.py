# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What a conversion writes, one strategy per kind of output behind one interface (`Output`):

- `DenseModel`: one dense model (every single-output method; the re-fit runs here);
- `DenseModels`: k dense models, one per cluster (`kmeans_multi_dense`, `output: dense`);
- `RebuiltMoE`: one MoE of the same family with k merged experts (`output: moe`);
- `PrunedMoE`: one MoE of the same family with N kept or merged experts per layer
  (`prune_experts`, `merge_experts`).

Each owns its planning, its writer, its `expert_weights.json` and its model card.
"""

from __future__ import annotations

from mergekit_moe2dense.outputs.base import LEGACY_STATS_FILE, SIDECAR_DIR, STATS_FILE, WEIGHTS_FILE, Output
from mergekit_moe2dense.outputs.clusters import DenseModels
from mergekit_moe2dense.outputs.dense import DenseModel
from mergekit_moe2dense.outputs.moe import RebuiltMoE
from mergekit_moe2dense.outputs.pruned import PrunedMoE

__all__ = [
    "LEGACY_STATS_FILE",
    "SIDECAR_DIR",
    "STATS_FILE",
    "WEIGHTS_FILE",
    "DenseModel",
    "DenseModels",
    "Output",
    "PrunedMoE",
    "RebuiltMoE",
    "output_for",
]


def output_for(method, params) -> Output:
    """The output a method's parameters ask for."""
    if method.writes_moe:
        return PrunedMoE()
    if not method.multi_output:
        return DenseModel()
    return RebuiltMoE() if params.output == "moe" else DenseModels()
