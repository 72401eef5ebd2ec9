# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""What every expert-merging method shares.

A method is a *weight strategy*: it declares its YAML parameters as a frozen
pydantic model (`Parameters`, `extra="forbid"`) and turns router statistics
into one of the plan types of plan.py, computed once per build: the per-layer
expert weights [L, E] (what expert_weights.json reports) and the `LayerPlan`s that
say how each dense MLP is assembled from the experts. The plan's type says what is
written; `plan_type` says it before calibration, for the pre-flight checks. The arithmetic of the merge
itself is one function for every method (`kernel.weighted_sum`).

Every method also accepts the re-fit parameters (`refit: none | scale |
down_proj | fit`, `refit_damping`, `refit_gate_up: merge | regmean`, and
`refit: fit`'s `fit_steps`, `fit_lr`, `fit_batch_tokens`, `fit_holdout`),
declared once in `MethodParameters`; the finishing stage (finish.py) runs the re-fit
(calibration/refit/) on whatever plan the method produced.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import pydantic
import torch
from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_serializer

from mergekit_moe2dense.errors import Moe2DenseError
from mergekit_moe2dense.families import MoELayer
from mergekit_moe2dense.plan import Align, DensePlan, MethodPlan, check_weights, single_block_plans
from mergekit_moe2dense.statistics import RouterStatistics

if TYPE_CHECKING:
    from mergekit_moe2dense.io.source import SourceModel

__all__ = [
    "ALIGN_DESCRIPTION",
    "Align",
    "ExpertMethod",
    "MethodError",
    "MethodParameters",
    "MethodPlan",
    "WeightedMerge",
    "check_weights",
    "model_top_k",
    "normalize_rows",
    "one_hot_rows",
]

PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Temperature = PositiveFloat
Refit = Literal["none", "scale", "down_proj", "fit"]
FIT_PARAMETERS = ("fit_steps", "fit_lr", "fit_batch_tokens", "fit_holdout")
ALIGN_DESCRIPTION = "permute each expert's hidden units to the most weighted expert's before averaging (alignment.py)"


class MethodError(Moe2DenseError, ValueError):
    """Bad method name or parameters; raised before anything expensive runs."""


class MethodParameters(pydantic.BaseModel):
    """The parameters every method accepts: the re-fit options (see refit.py).

    Subclasses add their own fields; a new re-fit option is one more field here.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    refit: Refit = Field(
        "none", description="re-fit the merged down projection to the MoE layer output, layer by layer"
    )
    refit_damping: PositiveFloat = Field(
        1e-4, description="ridge strength of refit: down_proj and regmean, relative to the mean activation energy"
    )
    refit_gate_up: Literal["merge", "regmean"] = Field(
        "merge", description="gate/up: the method's weighted sum, or RegMean over the routed tokens' Gram matrices"
    )
    fit_steps: Annotated[int, Field(ge=1, le=1_000_000)] = Field(300, description="refit: fit: Adam steps per layer")
    fit_lr: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = Field(
        0.1, description="refit: fit: Adam step size relative to each projection's RMS"
    )
    fit_batch_tokens: PositiveInt = Field(1024, description="refit: fit: calibration tokens per Adam step")
    fit_holdout: Annotated[float, Field(gt=0, le=0.5, allow_inf_nan=False)] = Field(
        0.1, description="refit: fit: fraction of the calibration tokens held out to keep the best step"
    )

    @field_validator(*FIT_PARAMETERS)
    @classmethod
    def _only_with_fit(cls, value, info: ValidationInfo):
        # validators run on given values only: a fit_* parameter must change something
        if info.data.get("refit") != "fit":
            raise ValueError("only used with refit: fit")
        return value

    @property
    def needs_refit(self) -> bool:
        return self.refit != "none" or self.refit_gate_up != "merge"

    @model_serializer(mode="wrap")
    def _method_parameters_first(self, handler):
        # The layout expert_weights.json and model cards have always had: the
        # method's own parameters, then the re-fit ones, then fixed values; the
        # fit_* ones only with refit: fit (they change nothing otherwise).
        data = handler(self)
        common = [k for k in MethodParameters.model_fields if data.get("refit") == "fit" or k not in FIT_PARAMETERS]
        fixed = type(self).model_computed_fields
        own = {k: v for k, v in data.items() if k not in MethodParameters.model_fields and k not in fixed}
        return {**own, **{k: data[k] for k in common}, **{k: data[k] for k in fixed if k in data}}


class ExpertMethod(ABC):
    """A way of turning calibration statistics into dense MLPs."""

    name: ClassVar[str]
    pretty_name: ClassVar[str]
    reference_url: ClassVar[str | None] = None
    Parameters: ClassVar[type[MethodParameters]] = MethodParameters

    # -- parameters ----------------------------------------------------------------
    def resolve_parameters(self, raw: Mapping[str, Any] | None, *, num_experts: int, top_k: int) -> MethodParameters:
        """YAML parameters as a typed `Parameters`, with model-dependent defaults filled."""
        raw = dict(raw or {})
        accepted = set(self.Parameters.model_fields)
        unknown = sorted(set(raw) - accepted)
        if unknown:
            raise MethodError(
                f"unknown parameter(s) for {self.name}: {', '.join(unknown)}; "
                f"accepted: {', '.join(sorted(accepted)) or 'none'}"
            )
        try:
            params = self.Parameters.model_validate(raw)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            name = str(first["loc"][0]) if first["loc"] else "?"
            raise MethodError(f"{self.name}: parameter {name}={raw.get(name)!r}: {first['msg']}") from None
        return self.complete(params, num_experts=num_experts, top_k=top_k)

    def complete(self, params: MethodParameters, *, num_experts: int, top_k: int) -> MethodParameters:
        """Cross-checks that need the model's shape; model-dependent defaults are
        filled in a new object (`params.model_copy(update=...)`), never in place."""
        return params

    # -- what the build needs before calibrating ----------------------------------------
    def needs_statistics(self, params: MethodParameters) -> bool:
        """Whether `plan` reads router statistics (most methods do)."""
        return True

    def needs_router_inputs(self, params: MethodParameters) -> bool:
        """Whether the method reads the routers' recorded inputs (`RouterStatistics.router_inputs`)."""
        return False

    def needs_expert_outputs(self, params: MethodParameters) -> bool:
        """Whether the method reads the Gram matrix of the experts' outputs or the full-softmax
        saliency (`RouterStatistics.output_gram`): recorded only when this says so."""
        return False

    def plan_type(self, params: MethodParameters) -> type[MethodPlan]:
        """The type of plan `plan` returns with `params`, which says what is written (plan.py)."""
        return DensePlan

    # -- the plan --------------------------------------------------------------------
    @abstractmethod
    def plan(self, stats: RouterStatistics | None, params: MethodParameters, layers: Sequence[MoELayer]) -> MethodPlan:
        """Expert weights and layer plans for every MoE layer, from one selection."""

    def refine(
        self, result: MethodPlan, stats: RouterStatistics | None, params: MethodParameters, source: SourceModel
    ) -> MethodPlan:
        """A second step for what needs the experts' weights (read from `source`, one layer at
        a time), called before the plan is finished (finish.py); by default the plan as it is."""
        return result


class WeightedMerge(ExpertMethod):
    """A method whose dense MLP is one block: each projection is sum_e w_e W_e (after the
    experts' hidden units are aligned to the most weighted one's, with `align`)."""

    def alignment(self, params: MethodParameters) -> Align:
        """How the experts' hidden units are aligned before averaging; a method with an
        `align` parameter returns it."""
        return "none"

    def needs_router_inputs(self, params) -> bool:
        return self.alignment(params) == "activations"

    def plan(self, stats, params, layers) -> DensePlan:
        weights = self.layer_weights(stats, params, num_layers=len(layers), num_experts=layers[0].num_experts)
        return DensePlan(weights, single_block_plans(layers, weights), align=self.alignment(params))

    @abstractmethod
    def layer_weights(
        self, stats: RouterStatistics | None, params: MethodParameters, *, num_layers: int, num_experts: int
    ) -> torch.Tensor:
        """[num_layers, num_experts] float64; each row non-negative, summing to 1."""


def normalize_rows(weights: torch.Tensor) -> torch.Tensor:
    weights = weights.double().clamp_min(0)
    total = weights.sum(-1, keepdim=True)
    if bool((total <= 0).any()):
        raise MethodError("a layer ended with all-zero expert weights")
    return weights / total


def model_top_k(params: MethodParameters, key: str, *, num_experts: int, top_k: int) -> MethodParameters:
    """`None` means the model's own top-k; anything else must be in 1..E."""
    value = getattr(params, key)
    if value is None:
        value = top_k
        params = params.model_copy(update={key: value})
    if not 1 <= value <= num_experts:
        raise MethodError(f"{key}={value} is out of range: the model has {num_experts} experts")
    return params


def one_hot_rows(indices: Sequence[int], num_experts: int) -> torch.Tensor:
    weights = torch.zeros(len(indices), num_experts, dtype=torch.float64)
    weights[torch.arange(len(indices)), torch.as_tensor(list(indices))] = 1.0
    return weights
