# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""One dense model: every MoE layer's sparse block becomes one MLP (plan.py), optionally
re-fitted layer by layer on the calibration tokens (calibration/sequential.py)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from transformers.activations import ACT2FN

from mergekit_moe2dense.alignment import align_layer
from mergekit_moe2dense.calibration.sequential import refit_layers
from mergekit_moe2dense.card import CardTable, calibration_summary, refit_table, write_model_card
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.graph import SpilledTensors, computed_tensors, plan_dense_merge, run_graph
from mergekit_moe2dense.outputs.base import Output, write_model_files, write_weights_file
from mergekit_moe2dense.plan import LayerPlan, with_family_scales
from mergekit_moe2dense.refit import FitSettings

LOG = logging.getLogger(__name__)
FITTED_DIR = ".fitted"  # in the staging directory: the re-fit's projections until the merge writes them


@dataclass
class DensePlan:
    weights: torch.Tensor  # [L, E], what expert_weights.json reports
    layers: list[LayerPlan]
    fitted: Mapping[str, torch.Tensor] = field(default_factory=dict)  # dense tensor name -> re-fitted value
    extra: dict | None = None  # more keys for expert_weights.json and the card (e.g. a cluster's share)
    calibration: dict | None = None  # what the statistics were computed on (card.calibration_summary)
    measured: tuple[CardTable, ...] = ()  # figures measured while converting, for the card


class DenseModel(Output):
    def check(self, job) -> None:
        if job.params.needs_refit and job.config.calibration is None:
            raise ConfigError(
                f"the re-fit (refit: {job.params.refit}, refit_gate_up: {job.params.refit_gate_up}) needs a "
                "calibration: block (its data is what is fitted)"
            )

    def plan(self, job, result, stats) -> DensePlan:
        source = job.source
        plans = with_family_scales(result.layers, source.family, source.config, stats)
        align = getattr(job.params, "align", "none")
        if align != "none":
            plans = aligned_plans(source, plans, stats, align)
        planned = DensePlan(result.weights, plans, calibration=calibration_summary(job, stats))
        if job.params.needs_refit:
            planned = self._refit(job, planned)
        return planned

    def _refit(self, job, planned: DensePlan) -> DensePlan:
        """Fit every layer's projections on the layer-sequential engine (refit.py)."""
        params = job.params
        fit = None
        if params.refit == "fit":
            fit = FitSettings(
                steps=params.fit_steps,
                lr=params.fit_lr,
                batch_tokens=params.fit_batch_tokens,
                holdout=params.fit_holdout,
            )
        result = refit_layers(
            job.source,
            planned.layers,
            job.batches,
            mode=params.refit,
            damping=params.refit_damping,
            gate_up=params.refit_gate_up,
            fit=fit,
            device=job.device,
            dtype=job.calibration_dtype,
            compute_dtype=job.compute_dtype,
            spill_dir=job.config.calibration.spill_dir,
            progress=job.progress,
            store=SpilledTensors(os.path.join(job.out.staging, FITTED_DIR)),  # not one per layer in memory
        )
        for index, (before, after) in sorted(result.errors.items()):
            LOG.info("layer %d: relative MLP reconstruction error %.4g -> %.4g after refit", index, before, after)
        for index, (start, end) in sorted(result.heldout.items()):
            LOG.info(
                "layer %d: held-out relative error %.4g (least-squares start) -> %.4g (refit: fit), %.1f s",
                index,
                start,
                end,
                result.seconds[index],
            )
        layers = [dataclasses.replace(plan, fitted=_fitted(params, plan)) for plan in planned.layers]
        return dataclasses.replace(
            planned, layers=layers, fitted=result.tensors, measured=(*planned.measured, refit_table(result.errors))
        )

    def write(self, job, planned: DensePlan, staging: str) -> None:
        source = job.source
        family = source.family
        widths = [_plan_width(source, plan) for plan in planned.layers]
        dense_width = family.dense_layer_width(source.config)
        width = max(widths + [dense_width or 0])
        padded = set(widths) != {width} or (dense_width is not None and dense_width != width)
        with computed_tensors(planned.fitted) as fitted:
            run_graph(
                plan_dense_merge(
                    job.io, source, planned.layers, staging, width=width if padded else None, fitted=fitted
                ),
                job.options,
            )
        shutil.rmtree(os.path.join(staging, FITTED_DIR), ignore_errors=True)
        write_model_files(staging, job, family.dense_config(source.config, intermediate_size=width))
        write_weights_file(staging, job, {"layers": planned.weights.tolist(), **(planned.extra or {})})
        if job.options.write_model_card:
            write_model_card(
                staging,
                job,
                planned.weights,
                planned.extra,
                calibration=planned.calibration,
                tables=planned.measured,
            )


def aligned_plans(source, plans: list[LayerPlan], stats, mode: str) -> list[LayerPlan]:
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


def _plan_width(source, plan: LayerPlan) -> int:
    """Intermediate size of a layer's dense MLP: the sum of its blocks' widths."""
    layer = plan.layer
    return sum(
        source.reader.shape((layer.shared_experts[b.shared] if b.shared is not None else layer.experts[0])["gate"])[0]
        for b in plan.blocks
    )
