# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The expert-merging methods, one module each; our registry, and mergekit's.

`METHODS` maps each name to its method; `register` adds one and refuses a name
already taken. `register_methods` makes every registered method known to
mergekit's registry too (through `adapter.MergekitAdapter`).
"""

from __future__ import annotations

import mergekit.merge_methods as mergekit_methods

from mergekit_moe2dense.methods.adapter import MergekitAdapter
from mergekit_moe2dense.methods.base import ExpertMethod, MethodError, MethodParameters, MethodPlan
from mergekit_moe2dense.methods.baselines import ExpertUniform, SingleExpert
from mergekit_moe2dense.methods.concat import Concat, MaxContribution
from mergekit_moe2dense.methods.kmeans_multi_dense import KMeansMultiDense
from mergekit_moe2dense.methods.merge_experts import MergeExperts
from mergekit_moe2dense.methods.prune_experts import PruneExperts
from mergekit_moe2dense.methods.router_weighted import RouterWeighted
from mergekit_moe2dense.methods.top_k_tempered import TopKTempered

METHODS: dict[str, ExpertMethod] = {}
# One adapter per method for the life of the process: mergekit's registry holds it.
ADAPTERS: dict[str, MergekitAdapter] = {}


def register(method: ExpertMethod) -> ExpertMethod:
    """Add `method` to `METHODS`; a second method with the same name is refused."""
    if method.name in METHODS:
        raise MethodError(f"a merge method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


for _method in (
    RouterWeighted(),
    TopKTempered(),
    ExpertUniform(),
    SingleExpert(),
    Concat(),
    MaxContribution(),
    KMeansMultiDense(),
    PruneExperts(),
    MergeExperts(),
):
    register(_method)
del _method


def register_methods() -> None:
    """Add our methods to mergekit's registry; calling it again is a no-op."""
    registered = {m.spec.name: m for m in mergekit_methods.registered_methods()}
    for name, method in METHODS.items():
        if name not in ADAPTERS:
            ADAPTERS[name] = MergekitAdapter(method)
        adapter = ADAPTERS[name]
        if name not in registered:
            mergekit_methods.register(adapter)
        elif registered[name] is not adapter:
            raise RuntimeError(f"mergekit already has a different method named {name!r}")


def get_method(name: str) -> ExpertMethod:
    """The method registered as `name`; an unknown name raises `MethodError` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown merge_method {name!r}; mergekit-moe2dense methods: {', '.join(sorted(METHODS))}"
        ) from None


__all__ = [
    "ADAPTERS",
    "METHODS",
    "ExpertMethod",
    "MergekitAdapter",
    "MethodError",
    "MethodParameters",
    "MethodPlan",
    "get_method",
    "register",
    "register_methods",
]
