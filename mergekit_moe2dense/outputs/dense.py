# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The writer of one dense model (`DensePlan`): every MoE layer's sparse block becomes one
MLP, merged from the experts by the write graph or, where re-fitted, the fitted tensors."""

from __future__ import annotations

import logging
import os
import shutil

from mergekit_moe2dense.card import refit_table, write_model_card
from mergekit_moe2dense.finish import FITTED_DIR
from mergekit_moe2dense.graph import computed_tensors, plan_dense_merge, run_graph
from mergekit_moe2dense.outputs.base import WriteContext, write_model_files, write_weights_file
from mergekit_moe2dense.outputs.fp8 import FP8Weights, dense_fp8
from mergekit_moe2dense.plan import DensePlan, LayerPlan

__all__ = ["write_dense"]

LOG = logging.getLogger(__name__)


def write_dense(plan: DensePlan, context: WriteContext, staging: str, extra: dict | None = None) -> None:
    """A complete dense model in `staging`; `extra` adds keys to expert_weights.json and lines
    to the card (a cluster's share)."""
    _log_refit(plan)
    source = context.source
    family = source.family
    widths = [_plan_width(source, layer_plan) for layer_plan in plan.layers]
    dense_width = family.dense_layer_width(source.config)
    width = max(widths + [dense_width or 0])
    padded = set(widths) != {width} or (dense_width is not None and dense_width != width)
    config = family.dense_config(source.config, intermediate_size=width)
    fp8 = _fp8(context, plan, config)
    with computed_tensors(plan.fitted) as fitted:
        graph = plan_dense_merge(
            context.io,
            source,
            plan.layers,
            staging,
            width=width if padded else None,
            fitted=fitted,
            quantized=fp8.weights if fp8 else (),
        )
        run_graph(graph, context.options)
    shutil.rmtree(os.path.join(staging, FITTED_DIR), ignore_errors=True)
    write_model_files(staging, context, config, fp8.quantization_config if fp8 else None)
    extra = {**(extra or {}), **_padding_record(source, widths, width)}
    write_weights_file(staging, context, {"layers": plan.weights.tolist(), **extra})
    if context.options.write_model_card:
        tables = () if plan.refit_errors is None else (refit_table(plan.refit_errors),)
        write_model_card(staging, context, plan.weights, extra, calibration=context.calibration, tables=tables)


def _fp8(context: WriteContext, plan: DensePlan, config) -> FP8Weights | None:
    """With `output_quantization: fp8`, the dense model's FP8 weights (not the zero routers)."""
    if context.io.quantization != "fp8":
        return None
    source = context.source
    zeros = {name for p in plan.layers for name in source.family.dense_zero_tensors(source.config, p.layer.index)}
    return dense_fp8(config, context.io.fp8_block, zeros)


def _log_refit(plan: DensePlan) -> None:
    """The re-fit's measured errors, per layer, in the log (the card has them as a table)."""
    for index, (before, after) in sorted((plan.refit_errors or {}).items()):
        LOG.info("layer %d: relative MLP reconstruction error %.4g -> %.4g after refit", index, before, after)
    for index, (start, end, seconds) in sorted(plan.refit_heldout.items()):
        LOG.info(
            "layer %d: held-out relative error %.4g (least-squares start) -> %.4g (refit: fit), %.1f s",
            index,
            start,
            end,
            seconds,
        )


def _padding_record(source, widths: list[int], width: int) -> dict:
    """Where converted layers differ in width (concat's `budget: spread`): each one's MLP width,
    and the converted MLPs' gate, up and down weights as written (zero-padded to `width`) and
    as used (the padded units add exactly 0). Nothing where every layer has the same width."""
    if len(set(widths)) <= 1:
        return {}
    per_unit = 3 * source.family.dims(source.config)["H"]
    return {
        "mlp_widths": widths,
        "mlp_parameters_on_disk": per_unit * width * len(widths),
        "mlp_parameters_effective": per_unit * sum(widths),
    }


def _plan_width(source, plan: LayerPlan) -> int:
    """Intermediate size of a layer's dense MLP: the sum of its blocks' widths."""
    layer = plan.layer
    return sum(
        source.reader.shape((layer.shared_experts[b.shared] if b.shared is not None else layer.experts[0])["gate"])[0]
        for b in plan.blocks
    )
