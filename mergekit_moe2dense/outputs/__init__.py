# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The writers: each writes one plan type of plan.py, finished (finish.py), into the staging
directory, reading only its plan and a small frozen `WriteContext`:

- `DensePlan`: one dense model (outputs/dense.py);
- `ClusterPlan`: k dense models, one per cluster (outputs/clusters.py);
- `MoEPlan`: one MoE of the same family with k merged experts (outputs/moe.py);
- `SmallerMoEPlan`: one MoE of the same family with N kept or merged experts per layer
  (outputs/pruned.py).

Each writes its `expert_weights.json` and model card. What is checked before any work, and
the size estimate, are in outputs/preflight.py; which tensors an output writes in FP8
(`output_quantization: fp8`), in outputs/fp8.py.
"""

from __future__ import annotations

from mergekit_moe2dense.outputs.base import (
    LEGACY_STATS_FILE,
    SIDECAR_DIR,
    STATS_FILE,
    WEIGHTS_FILE,
    WriteContext,
    output_quantization,
)
from mergekit_moe2dense.outputs.clusters import write_clusters
from mergekit_moe2dense.outputs.dense import write_dense
from mergekit_moe2dense.outputs.moe import write_moe
from mergekit_moe2dense.outputs.preflight import OutputKind, check_output, estimated_bytes
from mergekit_moe2dense.outputs.pruned import write_smaller_moe
from mergekit_moe2dense.plan import ClusterPlan, DensePlan, MethodPlan, MoEPlan, SmallerMoEPlan

__all__ = [
    "LEGACY_STATS_FILE",
    "SIDECAR_DIR",
    "STATS_FILE",
    "WEIGHTS_FILE",
    "OutputKind",
    "WriteContext",
    "check_output",
    "estimated_bytes",
    "output_quantization",
    "write",
]

WRITERS = {
    DensePlan: write_dense,
    ClusterPlan: write_clusters,
    MoEPlan: write_moe,
    SmallerMoEPlan: write_smaller_moe,
}


def write(plan: MethodPlan, context: WriteContext, staging: str) -> None:
    """The complete output of a finished `plan` in `staging`."""
    WRITERS[type(plan)](plan, context, staging)
