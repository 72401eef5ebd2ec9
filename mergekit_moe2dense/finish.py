# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The finishing of a method's plan: what its writer needs beyond the method's decision.

build.py calls the steps in this order, each a function of the plan and what it needs,
each returning a new plan (a step that does not apply to a plan's type returns it as is):

1. `family_scales`: the family's routed and shared-expert scales (plan.with_family_scales);
   for k dense models, each cluster's layer plans;
2. `align`: each merged group's hidden units permuted to its reference (alignment.py);
3. `router_rows`: an MoE output's expert-indexed tensors (the new routers: closed form, or
   a logistic regression on the recorded router inputs; reassemble.py);
4. `refit`: the layer-sequential re-fit on the calibration tokens (calibration/refit/
   for a dense model, calibration/smaller_moe.py for a smaller MoE).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

from transformers.activations import ACT2FN

from mergekit_moe2dense.alignment import align_layer
from mergekit_moe2dense.calibration.refit import fit_layers, refit_fitter
from mergekit_moe2dense.calibration.settings import StreamSettings
from mergekit_moe2dense.calibration.smaller_moe import fit_smaller_moe
from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.graph.spill import SpilledTensors
from mergekit_moe2dense.methods import MethodParameters
from mergekit_moe2dense.methods.merge_experts import group_labels
from mergekit_moe2dense.plan import (
    ClusterPlan,
    DensePlan,
    LayerPlan,
    MethodPlan,
    MoEPlan,
    SmallerMoEPlan,
    single_block_plans,
    with_family_scales,
)
from mergekit_moe2dense.reassemble import closed_form_rows, fitted_router
from mergekit_moe2dense.refit import FitSettings

__all__ = ["FITTED_DIR", "RefitInputs", "align", "family_scales", "refit", "router_rows"]

LOG = logging.getLogger(__name__)
FITTED_DIR = ".fitted"  # in the staging directory: the re-fit's projections until the merge writes them


def family_scales(plan: MethodPlan, source, stats) -> MethodPlan:
    """The family's scales on every routed block, and the shared experts appended (a dense
    model, or each of k dense models); an MoE output keeps the source's own scales."""
    family, config = source.family, source.config
    if isinstance(plan, DensePlan):
        return dataclasses.replace(plan, layers=with_family_scales(plan.layers, family, config, stats))
    if isinstance(plan, ClusterPlan):
        layers = [layer_plan.layer for layer_plan in plan.layers]
        models = tuple(
            tuple(with_family_scales(single_block_plans(layers, weights), family, config, stats))
            for weights in plan.clusters.weights
        )
        return dataclasses.replace(plan, models=models)
    return plan


def align(plan: MethodPlan, source, stats) -> MethodPlan:
    """The plan's merged experts with their hidden units permuted to their reference's."""
    if isinstance(plan, DensePlan) and plan.align != "none":
        return dataclasses.replace(plan, layers=_aligned_plans(source, plan.layers, stats, plan.align))
    if isinstance(plan, SmallerMoEPlan):
        layers = [layer_plan.layer for layer_plan in plan.layers]
        return dataclasses.replace(plan, moe_layers=tuple(_aligned_groups(source, layers, plan, stats)))
    return plan


def _aligned_plans(source, plans, stats, mode: str) -> list[LayerPlan]:
    """Each plan's averaged experts with their hidden units permuted to the most weighted one's
    (alignment.py); plans whose routed blocks are one expert each are left as they are."""
    act = ACT2FN[source.config.hidden_act]
    aligned = []
    for position, plan in enumerate(plans):
        routed = [block for block in plan.blocks if block.shared is None]
        if len(routed) != 1:
            aligned.append(plan)
            continue
        weights = routed[0].weights
        group = sorted((e for e, w in enumerate(weights) if w != 0.0), key=lambda e: (-weights[e], e))
        inputs = stats.router_inputs[position] if mode == "activations" else None
        layer = align_layer(plan.layer, [group], source.reader.read_slice, mode, inputs=inputs, act=act)
        aligned.append(dataclasses.replace(plan, layer=layer))
    return aligned


def _aligned_groups(source, layers, plan: SmallerMoEPlan, stats) -> list[MoELayer]:
    """Each layer with its groups' members permuted to their reference (none: unchanged)."""
    if plan.align == "none":
        return list(layers)
    act = ACT2FN[source.config.hidden_act]
    out = []
    for position, layer in enumerate(layers):
        inputs = stats.router_inputs[position] if plan.align == "activations" else None
        groups = plan.experts.groups[position]
        out.append(align_layer(layer, groups, source.reader.read_slice, plan.align, inputs=inputs, act=act))
    return out


def router_rows(plan: MethodPlan, source, stats) -> MethodPlan:
    """Every expert-indexed tensor of an MoE output's blocks (closed_form_rows), its router
    fitted to the recorded router inputs with `router: fitted`."""
    if isinstance(plan, MoEPlan):
        clusters, k = plan.clusters, plan.clusters.weights.shape[0]
        rows = {}
        for p, layer_plan in enumerate(plan.layers):
            router = None
            if plan.router == "fitted":
                labels = clusters.decomposition.labels[p]
                router = fitted_router(stats.router_inputs[p], labels, k, seed=plan.seed)
            rows.update(closed_form_rows(source, layer_plan.layer, clusters.weights[:, p], router))
        return dataclasses.replace(plan, rows=rows)
    if isinstance(plan, SmallerMoEPlan):
        experts, weights = plan.experts, plan.experts.weights
        rows = {}
        for position, layer in enumerate(plan.moe_layers):
            router = None
            if plan.router == "fitted":
                labels = group_labels(stats.samples[position], experts.groups[position])
                router = fitted_router(stats.router_inputs[position], labels, experts.num_experts)
            rows.update(closed_form_rows(source, layer, weights[:, position], router))
        return dataclasses.replace(plan, rows=rows)
    return plan


@dataclass(frozen=True)
class RefitInputs:
    """What the re-fit reads besides the plan: the model, the calibration token batches, the
    method's re-fit parameters, the layer stream's settings, and the staging directory (where
    a dense model's fitted projections wait on disk past a few MB)."""

    source: object  # io.source.SourceModel
    batches: list
    params: MethodParameters
    stream: StreamSettings
    staging: str


def refit(plan: MethodPlan, inputs: RefitInputs | None) -> MethodPlan:
    """The layer-sequential re-fit the parameters ask for (`inputs` None: none, the plan as it is)."""
    if inputs is None:
        return plan
    params = inputs.params
    if isinstance(plan, DensePlan) and params.needs_refit:
        return _refit_dense(plan, inputs)
    if isinstance(plan, SmallerMoEPlan) and params.refit == "down_proj":
        return _refit_smaller_moe(plan, inputs)
    return plan


def _refit_dense(plan: DensePlan, inputs: RefitInputs) -> DensePlan:
    """Fit every layer's projections on the layer-sequential engine (refit.py)."""
    params = inputs.params
    fit = None
    if params.refit == "fit":
        fit = FitSettings(
            steps=params.fit_steps, lr=params.fit_lr, batch_tokens=params.fit_batch_tokens, holdout=params.fit_holdout
        )
    fitter = refit_fitter(params.refit, params.refit_damping, params.refit_gate_up, fit)
    store = SpilledTensors(os.path.join(inputs.staging, FITTED_DIR))  # not one per layer in memory
    result = fit_layers(inputs.source, plan.layers, inputs.batches, fitter, inputs.stream, store)
    heldout = {index: (start, end, result.seconds[index]) for index, (start, end) in result.heldout.items()}
    layers = [dataclasses.replace(layer_plan, fitted=_fitted(params, layer_plan)) for layer_plan in plan.layers]
    return dataclasses.replace(
        plan, layers=layers, fitted=result.tensors, refit_errors=result.errors, refit_heldout=heldout
    )


def _refit_smaller_moe(plan: SmallerMoEPlan, inputs: RefitInputs) -> SmallerMoEPlan:
    source, params = inputs.source, inputs.params
    config = source.family.moe_config(source.config, params.num_experts, params.moe_top_k)
    result = fit_smaller_moe(
        source, config, list(plan.moe_layers), plan.experts.weights, inputs.batches, params.refit_damping, inputs.stream
    )
    for index, (before, after) in sorted(result.errors.items()):
        LOG.info("layer %d: relative MoE block error %.4g -> %.4g after refit", index, before, after)
    return dataclasses.replace(plan, fitted=result.tensors, refit_errors=result.errors)


def _fitted(params, plan: LayerPlan) -> tuple[str, ...]:
    """The projections the re-fit gives for a layer (the rest are merged): down unless `refit: none`,
    gate and up with RegMean, all three with `refit: fit`; each with its bias where the experts have
    one (GPT-OSS)."""
    if params.refit == "fit":
        fitted = ("gate", "up", "down")
    else:
        fitted = (("gate", "up") if params.refit_gate_up == "regmean" else ()) + (
            ("down",) if params.refit != "none" else ()
        )
    biases = tuple(f"{p}_bias" for p in fitted if f"{p}_bias" in plan.layer.experts[0])
    return fitted + biases
