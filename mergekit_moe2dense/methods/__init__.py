# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""The expert-merging methods, one module each, and their registration with mergekit."""

from __future__ import annotations

from typing import Dict, List

import mergekit.merge_methods as mergekit_methods

from mergekit_moe2dense.methods.base import ExpertMergeMethod, MethodError
from mergekit_moe2dense.methods.baselines import ExpertUniform, SingleExpert
from mergekit_moe2dense.methods.kmeans_multi_dense import KMeansMultiDense
from mergekit_moe2dense.methods.concat import Concat, MaxContribution
from mergekit_moe2dense.methods.router_weighted import RouterWeighted
from mergekit_moe2dense.methods.top_k_tempered import TopKTempered

METHODS: Dict[str, ExpertMergeMethod] = {
    method.name: method
    for method in (
        RouterWeighted(),
        TopKTempered(),
        ExpertUniform(),
        SingleExpert(),
        Concat(),
        MaxContribution(),
        KMeansMultiDense(),
    )
}


def register_methods() -> None:
    """Add our methods to mergekit's registry; calling it again is a no-op."""
    registered = {m.spec.name: m for m in mergekit_methods.registered_methods()}
    for name, method in METHODS.items():
        if name not in registered:
            mergekit_methods.register(method)
        elif not isinstance(registered[name], ExpertMergeMethod):
            raise RuntimeError(f"mergekit already has a different method named {name!r}")


def get_method(name: str) -> ExpertMergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise MethodError(
            f"unknown merge_method {name!r}; mergekit-moe2dense methods: {', '.join(sorted(METHODS))}"
        ) from None


def method_names() -> List[str]:
    return sorted(METHODS)


__all__ = ["METHODS", "ExpertMergeMethod", "MethodError", "get_method", "method_names", "register_methods"]
