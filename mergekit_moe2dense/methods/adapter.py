# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Each method as a mergekit `MergeMethod`, so mergekit's registry knows our names.

mergekit looks methods up by name (`mergekit.merge_methods.get`: its cards, its
config checks, and the import hook in plugin/ that sends our configs to our
planner). The adapter's spec lists the method's parameters, derived from its
pydantic `Parameters` (names, types with their constraints, defaults,
descriptions), so mergekit validates our YAML parameters as we do.

mergekit's own planner cannot run these methods: the expert weights come from
calibrating the MoE, not from the YAML, and the inputs are one model's experts,
not several models. `merge_group` says so; the conversion runs in build.py,
whose graph calls `kernel.weighted_sum`.
"""

from __future__ import annotations

from typing import Annotated, Any

from mergekit.merge_methods.base import (
    MISSING,
    GroupMergeMethod,
    InputContract,
    MergeMethodSpec,
    ParameterScope,
    ParameterSpec,
    TensorGroup,
)

from mergekit_moe2dense.methods.base import ExpertMethod, MethodError, MethodParameters


def parameter_specs(parameters: type[MethodParameters]) -> tuple[ParameterSpec, ...]:
    """mergekit parameter specs for every settable field of `parameters`."""
    specs = []
    for name, field in parameters.model_fields.items():
        value_type = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
        default = MISSING if field.is_required() else field.default
        specs.append(ParameterSpec(name, value_type, ParameterScope.SHARED, default, field.description))
    return tuple(specs)


class MergekitAdapter(GroupMergeMethod):
    """A method as mergekit sees it: a name, its parameters, and no kernel of its own."""

    def __init__(self, method: ExpertMethod):
        self.method = method
        self.spec = MergeMethodSpec(
            name=method.name,
            pretty_name=method.pretty_name,
            reference_url=method.reference_url,
            parameters=parameter_specs(method.Parameters),
            contract=InputContract(min_inputs=1),
        )

    def merge_group(self, group: TensorGroup, /, **_params: Any):
        raise MethodError(
            f"{self.method.name} merges one MoE's experts with weights from calibration; run it with "
            "mergekit-moe2dense (or mergekit-yaml with the plugin installed), not mergekit's planner"
        )
