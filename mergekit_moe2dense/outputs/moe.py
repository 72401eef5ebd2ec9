# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""One MoE of the same family with k experts, each a merge of the original experts
(`kmeans_multi_dense`, `output: moe`); the new routers are computed in memory
(reassemble.py). expert_weights.json holds every expert's weights (`experts`
[k][L][E]) and token shares."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mergekit_moe2dense.card import calibration_summary, write_moe_card
from mergekit_moe2dense.graph import computed_tensors, run_graph
from mergekit_moe2dense.outputs.base import Output, output_bytes, write_model_files, write_weights_file
from mergekit_moe2dense.outputs.clusters import check_clusters
from mergekit_moe2dense.reassemble import closed_form_rows, fitted_router, plan_moe_merge


@dataclass
class MoEPlan:
    clusters: object  # methods.kmeans_multi_dense.ClusterWeights
    routers: dict[str, torch.Tensor]  # every expert-indexed tensor of every block (router [k, H], ...), by output name
    calibration: dict | None = None  # what the statistics were computed on (card.calibration_summary)

    @property
    def weights(self) -> torch.Tensor:
        return self.clusters.weights


class RebuiltMoE(Output):
    def check(self, job) -> None:
        check_clusters(job)
        family, config, params = job.source.family, job.source.config, job.params
        family.moe_config(config, params.num_clusters, params.moe_top_k)  # raises where the family cannot

    def reported_weights(self, result):
        return result.clusters.weights

    def estimated_bytes(self, job):
        return output_bytes(job, experts_per_layer=job.params.num_clusters)

    def plan(self, job, result, stats) -> MoEPlan:
        clusters, params = result.clusters, job.params
        routers = [None] * len(job.layers)
        if params.router == "fitted":
            labels = clusters.decomposition.labels
            routers = [
                fitted_router(stats.router_inputs[p], labels[p], params.num_clusters, seed=params.seed)
                for p in range(len(job.layers))
            ]
        rows = {}
        for p, layer in enumerate(job.layers):
            rows.update(closed_form_rows(job.source, layer, clusters.weights[:, p], routers[p]))
        return MoEPlan(clusters, rows, calibration_summary(job, stats))

    def write(self, job, planned: MoEPlan, staging: str) -> None:
        source, params = job.source, job.params
        with computed_tensors(planned.routers) as routers:
            run_graph(plan_moe_merge(job.io, source, job.layers, planned.weights, routers, staging), job.options)
        write_model_files(staging, job, source.family.moe_config(source.config, params.num_clusters, params.moe_top_k))
        shares = planned.clusters.shares
        write_weights_file(staging, job, {"experts": planned.weights.tolist(), "token_share": shares})
        if job.options.write_model_card:
            write_moe_card(staging, job, shares, calibration=planned.calibration)
