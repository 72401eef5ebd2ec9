# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The writer of a smaller MoE of the same family: N kept or merged experts per MoE layer
(`SmallerMoEPlan`: `prune_experts`, `merge_experts`).

The plan's `ExpertGroups` say which old experts make each new one; the finishing stage
(finish.py) aligned each group's members to its reference, computed the new expert-indexed
tensors of every block and, with `refit: down_proj`, re-fitted every new expert's down
projection. The graph writes the experts (merged from the checkpoint, or fitted), the new
rows, the shared experts and every other tensor, copied. config.json is the source's with N
experts and the new top-k.
"""

from __future__ import annotations

from mergekit_moe2dense.card import write_smaller_moe_card
from mergekit_moe2dense.graph import computed_tensors, plan_moe_merge, run_graph
from mergekit_moe2dense.outputs.base import WriteContext, write_model_files, write_weights_file
from mergekit_moe2dense.outputs.fp8 import moe_fp8
from mergekit_moe2dense.plan import SmallerMoEPlan

__all__ = ["write_smaller_moe"]


def write_smaller_moe(plan: SmallerMoEPlan, context: WriteContext, staging: str) -> None:
    """A complete smaller MoE in `staging`."""
    source, params, experts = context.source, context.params, plan.experts
    weights = experts.weights
    config = source.family.moe_config(source.config, params.num_experts, params.moe_top_k)
    fp8 = moe_fp8(context, config, params.num_experts)
    with computed_tensors({**plan.rows, **plan.fitted}) as computed:
        rows = {name: computed[name] for name in plan.rows}
        fitted = {name: computed[name] for name in plan.fitted}
        graph = plan_moe_merge(
            context.io,
            source,
            plan.moe_layers,
            weights,
            rows,
            staging,
            fitted=fitted,
            quantized=fp8.weights if fp8 else (),
        )
        run_graph(graph, context.options, desc=_progress_label(experts, params.num_experts))
    write_model_files(staging, context, config, fp8.quantization_config if fp8 else None)
    payload = {
        "experts": weights.tolist(),
        "groups": [[list(group) for group in layer] for layer in experts.groups],
        "saliency": experts.saliency.tolist(),
    }
    if plan.refit_errors:
        payload["refit_errors"] = {str(k): list(v) for k, v in sorted(plan.refit_errors.items())}
    write_weights_file(staging, context, payload)
    if context.options.write_model_card:
        write_smaller_moe_card(staging, context, experts)


def _progress_label(experts, num_experts: int) -> str:
    """What the bar says the graph does: every new expert one old expert is pruning, else merging."""
    pruning = all(len(group) == 1 for layer in experts.groups for group in layer)
    return f"{'Pruning' if pruning else 'Merging'} experts to {num_experts} per layer"
