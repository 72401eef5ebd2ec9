# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The writer of k dense models, one per cluster of calibration tokens (`ClusterPlan`).

OUT/cluster_0/ ... OUT/cluster_{k-1}/ are complete dense models (cluster 0 covers
the most calibration tokens), each with its token share in its expert_weights.json
and model card; OUT/clusters.json summarises them.
"""

from __future__ import annotations

import json
import os

from mergekit_moe2dense.outputs.base import WriteContext
from mergekit_moe2dense.outputs.dense import write_dense
from mergekit_moe2dense.plan import ClusterPlan, DensePlan

__all__ = ["SUMMARY_FILE", "cluster_dir", "write_clusters"]

SUMMARY_FILE = "clusters.json"


def cluster_dir(index: int) -> str:
    return f"cluster_{index}"


def write_clusters(plan: ClusterPlan, context: WriteContext, staging: str) -> None:
    """Each cluster's dense model in its directory of `staging`, and the summary beside them."""
    shares = plan.clusters.shares
    for index, (weights, layers) in enumerate(zip(plan.clusters.weights, plan.models)):
        target = os.path.join(staging, cluster_dir(index))
        os.makedirs(target)
        extra = {"cluster": index, "num_clusters": len(shares), "token_share": shares[index]}
        write_dense(DensePlan(weights, layers), context, target, extra)
    summary = {
        "method": context.config.merge_method,
        "parameters": context.params.model_dump(mode="json"),
        "clusters": [{"path": cluster_dir(i), "token_share": share} for i, share in enumerate(shares)],
    }
    with open(os.path.join(staging, SUMMARY_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
