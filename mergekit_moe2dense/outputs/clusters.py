# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""k dense models, one per cluster of calibration tokens (`kmeans_multi_dense`, `output: dense`).

OUT/cluster_0/ ... OUT/cluster_{k-1}/ are complete dense models (cluster 0 covers
the most calibration tokens), each with its token share in its expert_weights.json
and model card; OUT/clusters.json summarises them.
"""

from __future__ import annotations

import json
import os

from mergekit_moe2dense.card import calibration_summary
from mergekit_moe2dense.methods import MethodError
from mergekit_moe2dense.outputs.base import Output, output_bytes
from mergekit_moe2dense.outputs.dense import DenseModel, DensePlan
from mergekit_moe2dense.plan import single_block_plans, with_family_scales

SUMMARY_FILE = "clusters.json"


def cluster_dir(index: int) -> str:
    return f"cluster_{index}"


class DenseModels(Output):
    def check(self, job) -> None:
        check_clusters(job)

    def reported_weights(self, result):
        return result.clusters.weights

    def estimated_bytes(self, job):
        one = output_bytes(job, experts_per_layer=1)
        return None if one is None else job.params.num_clusters * one

    def plan(self, job, result, stats) -> list:
        clusters = result.clusters
        shares = clusters.shares
        source = job.source
        return [
            DensePlan(
                weights,
                with_family_scales(single_block_plans(job.layers, weights), source.family, source.config, stats),
                extra={"cluster": index, "num_clusters": len(shares), "token_share": shares[index]},
                calibration=calibration_summary(job, stats),
            )
            for index, weights in enumerate(clusters.weights)
        ]

    def write(self, job, planned: list, staging: str) -> None:
        for index, model in enumerate(planned):
            target = os.path.join(staging, cluster_dir(index))
            os.makedirs(target)
            DenseModel().write(job, model, target)
        summary = {
            "method": job.config.merge_method,
            "parameters": job.params.model_dump(mode="json"),
            "clusters": [
                {"path": cluster_dir(i), "token_share": m.extra["token_share"]} for i, m in enumerate(planned)
            ],
        }
        with open(os.path.join(staging, SUMMARY_FILE), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=1)


def check_clusters(job) -> None:
    """Fail before calibration if the re-fit is asked for or too few tokens will be sampled."""
    params, calibration = job.params, job.config.calibration
    if params.needs_refit:
        raise MethodError(f"{job.config.merge_method} writes several models and does not support refit")
    k = params.num_clusters
    if job.stats_path is None and calibration is not None and calibration.max_token_samples < k:
        raise MethodError(
            f"{job.config.merge_method}: {k} clusters need calibration.max_token_samples >= {k} "
            f"(got {calibration.max_token_samples})"
        )
