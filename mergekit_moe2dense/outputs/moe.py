# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The writer of one MoE of the same family with k experts, each a merge of the original
experts (`MoEPlan`: `kmeans_multi_dense`, `output: moe`), with the new routers the finishing
stage computed (`finish.router_rows`). expert_weights.json holds every expert's weights
(`experts` [k][L][E]) and token shares."""

from __future__ import annotations

from mergekit_moe2dense.card import write_moe_card
from mergekit_moe2dense.graph import computed_tensors, plan_moe_merge, run_graph
from mergekit_moe2dense.outputs.base import WriteContext, write_model_files, write_weights_file
from mergekit_moe2dense.outputs.fp8 import moe_fp8
from mergekit_moe2dense.plan import MoEPlan

__all__ = ["write_moe"]


def write_moe(plan: MoEPlan, context: WriteContext, staging: str) -> None:
    """A complete k-expert MoE in `staging`."""
    source, weights = context.source, plan.clusters.weights
    k = weights.shape[0]
    config = source.family.moe_config(source.config, k, context.params.moe_top_k)
    fp8 = moe_fp8(context, config, k)
    with computed_tensors(plan.rows) as routers:
        quantized = fp8.weights if fp8 else ()
        graph = plan_moe_merge(context.io, source, context.layers, weights, routers, staging, quantized=quantized)
        run_graph(graph, context.options)
    write_model_files(staging, context, config, fp8.quantization_config if fp8 else None)
    shares = plan.clusters.shares
    write_weights_file(staging, context, {"experts": weights.tolist(), "token_share": shares})
    if context.options.write_model_card:
        write_moe_card(staging, context, shares, calibration=context.calibration)
