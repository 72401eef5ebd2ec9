# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""A smaller MoE of the same family: N kept or merged experts per MoE layer
(`prune_experts`, `merge_experts`).

The method's `ExpertGroups` (methods/prune_experts.py) say which old experts make each new one.
Here, before writing: the method's second step that needs the experts' weights
(`ExpertMethod.refine`: `merge_experts`' grouping by outputs); the alignment of each
group's members to its reference (`align`, alignment.py); the new expert-indexed
tensors of every block in closed form (the router rows: a kept expert's own row, a
group's saliency-weighted mix; or, `router: fitted`, a logistic regression); and, with `refit: down_proj`, the layer-sequential
re-fit of every new expert's down projection to the original block's output
(`calibration/smaller_moe.py`, on the layer loop). The graph then writes the experts
(merged from the checkpoint, or fitted), the new rows, the shared experts and every
other tensor, copied. config.json is the source's with N experts and the new top-k.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field

import torch
from transformers.activations import ACT2FN

from mergekit_moe2dense.alignment import align_layer
from mergekit_moe2dense.card import write_smaller_moe_card
from mergekit_moe2dense.config import ConfigError
from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.graph import computed_tensors, run_graph
from mergekit_moe2dense.methods import MethodError
from mergekit_moe2dense.methods.merge_experts import group_labels
from mergekit_moe2dense.methods.prune_experts import ExpertGroups
from mergekit_moe2dense.outputs.base import Output, output_bytes, write_model_files, write_weights_file
from mergekit_moe2dense.reassemble import closed_form_rows, fitted_router, plan_moe_merge

LOG = logging.getLogger(__name__)


@dataclass
class SmallerMoEPlan:
    experts: ExpertGroups
    layers: list[MoELayer]  # the source's MoE layers, members' slices permuted where aligned
    rows: dict[str, torch.Tensor]  # every expert-indexed block tensor of the new MoE, by output name
    fitted: dict[str, torch.Tensor] = field(default_factory=dict)  # re-fitted down projections, by output name
    errors: dict[int, tuple[float, float]] = field(default_factory=dict)  # layer -> block error before, after

    @property
    def weights(self) -> torch.Tensor:
        return self.experts.weights


class PrunedMoE(Output):
    def check(self, job) -> None:
        params = job.params
        if params.refit == "scale" or params.refit_gate_up != "merge":
            raise MethodError(
                f"{job.config.merge_method} writes an MoE: its re-fit is refit: down_proj (each new expert's "
                "down projection, the whole block fitted), not refit: scale or refit_gate_up: regmean"
            )
        if params.refit != "none" and job.config.calibration is None:
            raise ConfigError(f"refit: {params.refit} needs a calibration: block (its data is what is fitted)")
        job.source.family.moe_config(job.source.config, params.num_experts, params.moe_top_k)  # raises if it cannot

    def reported_weights(self, result):
        return result.experts.weights

    def estimated_bytes(self, job):
        return output_bytes(job, experts_per_layer=job.params.num_experts)

    def plan(self, job, result, stats) -> SmallerMoEPlan:
        source, params = job.source, job.params
        result = job.method.refine(result, stats, params, source)
        experts = result.experts
        layers = aligned_layers(source, job.layers, experts, stats, getattr(params, "align", "none"))
        weights = experts.weights
        rows = {}
        for position, layer in enumerate(layers):
            router = None
            if getattr(params, "router", "closed_form") == "fitted":
                labels = group_labels(stats.samples[position], experts.groups[position])
                router = fitted_router(stats.router_inputs[position], labels, experts.num_experts)
            rows.update(closed_form_rows(source, layer, weights[:, position], router))
        planned = SmallerMoEPlan(experts, layers, rows)
        if params.refit == "down_proj":
            planned = self._refit(job, planned)
        return planned

    def _refit(self, job, planned: SmallerMoEPlan) -> SmallerMoEPlan:
        from mergekit_moe2dense.calibration.smaller_moe import fit_smaller_moe

        source, params = job.source, job.params
        config = source.family.moe_config(source.config, params.num_experts, params.moe_top_k)
        result = fit_smaller_moe(
            source,
            config,
            planned.layers,
            planned.weights,
            job.batches,
            damping=params.refit_damping,
            device=job.device,
            dtype=job.calibration_dtype,
            compute_dtype=job.compute_dtype,
            spill_dir=job.config.calibration.spill_dir,
            progress=job.progress,
        )
        for index, (before, after) in sorted(result.errors.items()):
            LOG.info("layer %d: relative MoE block error %.4g -> %.4g after refit", index, before, after)
        return dataclasses.replace(planned, fitted=result.tensors, errors=result.errors)

    def write(self, job, planned: SmallerMoEPlan, staging: str) -> None:
        source, params = job.source, job.params
        tensors = {**planned.rows, **planned.fitted}
        with computed_tensors(tensors) as computed:
            rows = {name: computed[name] for name in planned.rows}
            fitted = {name: computed[name] for name in planned.fitted}
            graph = plan_moe_merge(job.io, source, planned.layers, planned.weights, rows, staging, fitted=fitted)
            run_graph(graph, job.options)
        write_model_files(staging, job, source.family.moe_config(source.config, params.num_experts, params.moe_top_k))
        payload = {
            "experts": planned.weights.tolist(),
            "groups": [[list(group) for group in layer] for layer in planned.experts.groups],
            "saliency": planned.experts.saliency.tolist(),
        }
        if planned.errors:
            payload["refit_errors"] = {str(k): list(v) for k, v in sorted(planned.errors.items())}
        write_weights_file(staging, job, payload)
        if job.options.write_model_card:
            write_smaller_moe_card(staging, job, planned.experts)


def aligned_layers(source, layers, experts: ExpertGroups, stats, mode: str) -> list[MoELayer]:
    """Each layer with its groups' members permuted to their reference (none: unchanged)."""
    if mode == "none":
        return list(layers)
    act = ACT2FN[source.config.hidden_act]
    out = []
    for position, layer in enumerate(layers):
        inputs = stats.router_inputs[position] if mode == "activations" else None
        out.append(align_layer(layer, experts.groups[position], source.reader.read_slice, mode, inputs=inputs, act=act))
    return out
