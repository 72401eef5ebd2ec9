# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Before any work: whether the output a method's parameters ask for can be written, and at
least how many bytes it will take. Both are functions of the plan type the method will return
(`ExpertMethod.plan_type`), its parameters and the source model; the job runs them while it
is prepared (job.py), before the calibration pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergekit_moe2dense.config import CalibrationConfig, ConfigError
from mergekit_moe2dense.methods import MethodError, MethodParameters
from mergekit_moe2dense.outputs.base import output_bytes
from mergekit_moe2dense.plan import ClusterPlan, MethodPlan, MoEPlan, SmallerMoEPlan

__all__ = ["OutputKind", "check_output", "estimated_bytes"]


@dataclass(frozen=True)
class OutputKind:
    """The output a run writes, known before calibration: its plan type, and the
    checks and size estimate that come with it."""

    plan_type: type[MethodPlan]

    def estimated_bytes(self, job) -> int | None:
        """At least what the output of `job` (a `job.ConversionJob`) will hold (None: unknown)."""
        return estimated_bytes(self.plan_type, job.params, job.source, job.layers, job.out_dtype, job.quantization)


def check_output(
    plan_type: type[MethodPlan],
    method_name: str,
    params: MethodParameters,
    source,
    calibration: CalibrationConfig | None,
    stats_path: str | None,
) -> None:
    """Refusals that need only the config and the model: a re-fit the output does not support
    or that has no data, too few sampled tokens for k clusters, an MoE the family cannot write."""
    family, config = source.family, source.config
    if plan_type in (ClusterPlan, MoEPlan):
        if params.needs_refit:
            raise MethodError(f"{method_name} writes several models and does not support refit")
        k = params.num_clusters
        if stats_path is None and calibration is not None and calibration.max_token_samples < k:
            raise MethodError(
                f"{method_name}: {k} clusters need calibration.max_token_samples >= {k} "
                f"(got {calibration.max_token_samples})"
            )
        if plan_type is MoEPlan:
            family.moe_config(config, k, params.moe_top_k)  # raises where the family cannot
    elif plan_type is SmallerMoEPlan:
        if params.refit == "scale" or params.refit_gate_up != "merge":
            raise MethodError(
                f"{method_name} writes an MoE: its re-fit is refit: down_proj (each new expert's "
                "down projection, the whole block fitted), not refit: scale or refit_gate_up: regmean"
            )
        if params.refit != "none" and calibration is None:
            raise ConfigError(f"refit: {params.refit} needs a calibration: block (its data is what is fitted)")
        family.moe_config(config, params.num_experts, params.moe_top_k)  # raises if it cannot
    elif params.needs_refit and calibration is None:
        raise ConfigError(
            f"the re-fit (refit: {params.refit}, refit_gate_up: {params.refit_gate_up}) needs a "
            "calibration: block (its data is what is fitted)"
        )


def estimated_bytes(
    plan_type: type[MethodPlan],
    params: MethodParameters,
    source,
    layers,
    out_dtype: str | None,
    quantization: str = "none",
) -> int | None:
    """At least what the output will hold (None: unknown): a dense model's MLPs one expert wide
    (concatenations are wider), k of them for k clusters, an MoE's experts (quantized ones as
    stored, with `quantization` `source`; a dense model's matrices at a byte a value with `fp8`)."""
    if plan_type is MoEPlan:
        return output_bytes(source, layers, out_dtype, params.num_clusters, quantization)
    if plan_type is SmallerMoEPlan:
        return output_bytes(source, layers, out_dtype, params.num_experts, quantization)
    one = output_bytes(source, layers, out_dtype, experts_per_layer=1, quantization=quantization)
    if plan_type is ClusterPlan:
        return None if one is None else params.num_clusters * one
    return one
