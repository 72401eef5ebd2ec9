# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What every expert-merging method shares.

A method is a mergekit `MergeMethod`: registered by name, its YAML parameters
declared in its spec and validated by mergekit's own machinery, and its kernel a
weighted linear combination of one layer's experts (input and output shapes
equal, as mergekit requires). What differs between methods is only where the
per-layer expert weights come from: `layer_weights(stats, params)`.

Every method also accepts the re-fit parameters (`refit: none | scale |
down_proj`, `refit_damping`, `refit_gate_up: merge | regmean`), declared once here; build.py runs the re-fit
(calibration/sequential.py) on whatever plan the method produced.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar, Dict, Literal, Mapping, Optional, Sequence, Tuple

import pydantic
import torch
from pydantic import Field
from typing_extensions import Annotated
from mergekit.merge_methods.base import (
    MISSING,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    PerInputValues,
    TensorGroup,
)

from mergekit_moe2dense.calibration.stats import RouterStatistics
from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.plan import single_block_plans


class MethodError(Moe2DenseError, ValueError):
    """Bad method name or parameters; raised before anything expensive runs."""


def parameter(name: str, value_type: Any, default: Any = MISSING, description: str = "") -> ParameterSpec:
    return ParameterSpec(name, value_type, ParameterScope.SHARED, default, description)


class ExpertMergeMethod(GroupMergeMethod):
    """Merge a layer's experts linearly with weights learnt from calibration."""

    name: str
    pretty_name: str
    reference_url: Optional[str] = None
    parameters: Tuple[ParameterSpec, ...] = ()
    # Several outputs (k models or a rebuilt MoE): the method has `cluster_weights`
    # and `multi.write_outputs` writes them.
    multi_output: ClassVar[bool] = False
    default_refit: str = "none"

    def __init__(self):
        self.all_parameters = self.parameters + refit_parameters(self.default_refit)
        weight = ParameterSpec(
            "expert_weight", float, ParameterScope.INPUT, MISSING, "set by the planner"
        )
        self.spec = MergeMethodSpec(
            name=self.name,
            pretty_name=self.pretty_name,
            reference_url=self.reference_url,
            parameters=self.all_parameters + (weight,),
            contract=InputContract(min_inputs=1),
        )

    # -- the mergekit kernel -----------------------------------------------------
    def merge_group(
        self, group: TensorGroup, /, expert_weight: PerInputValues, **_params: Any
    ) -> torch.Tensor:
        """sum_e w_e W_e, accumulated in float32 (float64 if the inputs are).

        In-place mixed-dtype ops upcast each expert inside the kernel: no float32
        copy of every expert, one pass over its memory (the merge is memory-bound).
        """
        first = group.entries[0].tensor
        dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
        # not torch.mul(..., out=result): that computes in the inputs' bf16
        result = torch.zeros(first.shape, dtype=dtype, device=first.device)
        for entry in group.entries:
            result.add_(entry.tensor, alpha=float(expert_weight[entry.id]))
        return result

    # -- parameters ----------------------------------------------------------------
    def resolve_parameters(
        self, raw: Optional[Mapping[str, Any]], *, num_experts: int, top_k: int
    ) -> Dict[str, Any]:
        """Validate YAML parameters (types, ranges, unknown names) and fill defaults."""
        raw = dict(raw or {})
        known = {p.name for p in self.all_parameters}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise MethodError(
                f"unknown parameter(s) for {self.name}: {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(known)) or 'none'}"
            )
        values = {}
        for spec in self.all_parameters:
            if spec.name not in raw:
                if spec.required:
                    raise MethodError(f"{self.name} needs parameter {spec.name!r}")
                values[spec.name] = spec.default
                continue
            try:
                values[spec.name] = spec.validate(raw[spec.name])
            except pydantic.ValidationError as error:
                message = error.errors()[0]["msg"]
                raise MethodError(
                    f"{self.name}: parameter {spec.name}={raw[spec.name]!r}: {message}"
                ) from None
        self.check_parameters(values, num_experts=num_experts, top_k=top_k)
        return values

    def check_parameters(self, params: Dict[str, Any], *, num_experts: int, top_k: int) -> None:
        """Cross-checks that need the model's shape; fills model-dependent defaults."""

    # -- weights -------------------------------------------------------------------
    def needs_statistics(self, params: Mapping[str, Any]) -> bool:
        """Whether `layer_weights` reads router statistics (most methods do)."""
        return True

    def needs_router_inputs(self, params: Mapping[str, Any]) -> bool:
        """Whether the method reads the routers' recorded inputs (`RouterStatistics.router_inputs`)."""
        return False

    def layer_plans(self, layers, weights: torch.Tensor, stats, params) -> list:
        """How each layer's dense MLP is assembled; by default one merged block."""
        return single_block_plans(layers, weights)

    @abstractmethod
    def layer_weights(
        self, stats: Optional[RouterStatistics], params: Mapping[str, Any], *, num_layers: int, num_experts: int
    ) -> torch.Tensor:
        """[num_layers, num_experts] float64; each row non-negative, summing to 1."""


def refit_parameters(default: str) -> Tuple[ParameterSpec, ...]:
    """The re-fit options every method accepts (see refit.py)."""
    return (
        parameter(
            "refit",
            Literal["none", "scale", "down_proj"],
            default,
            "re-fit the merged down projection to the MoE layer output, layer by layer",
        ),
        parameter(
            "refit_damping",
            Annotated[float, Field(gt=0, allow_inf_nan=False)],
            1e-4,
            "ridge strength of refit: down_proj and regmean, relative to the mean activation energy",
        ),
        parameter(
            "refit_gate_up",
            Literal["merge", "regmean"],
            "merge",
            "gate/up: the method's weighted sum, or RegMean over the routed tokens' Gram matrices",
        ),
    )


def normalize_rows(weights: torch.Tensor) -> torch.Tensor:
    weights = weights.double().clamp_min(0)
    total = weights.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise MethodError("a layer ended with all-zero expert weights")
    return weights / total


def check_top_k(params: Dict[str, Any], *, num_experts: int, top_k: int, key: str = "top_k") -> None:
    """`None` means the model's own top-k; anything else must be in 1..E."""
    if params.get(key) is None:
        params[key] = top_k
    if not 1 <= params[key] <= num_experts:
        raise MethodError(f"{key}={params[key]} is out of range: the model has {num_experts} experts")


def one_hot_rows(indices: Sequence[int], num_experts: int) -> torch.Tensor:
    weights = torch.zeros(len(indices), num_experts, dtype=torch.float64)
    weights[torch.arange(len(indices)), torch.as_tensor(list(indices))] = 1.0
    return weights
