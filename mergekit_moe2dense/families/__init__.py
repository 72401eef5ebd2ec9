# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""MoE family adapters, and the one plain list of them."""

from __future__ import annotations

from typing import List

import transformers

from mergekit_moe2dense.families.base import (
    PROJECTIONS,
    ExpertSlice,
    MoEFamily,
    MoELayer,
    UnsupportedModelError,
)
from mergekit_moe2dense.families.mixtral import MixtralFamily

FAMILIES: List[MoEFamily] = [MixtralFamily()]

# Sparse model types we know of but cannot convert yet, with the reason.
KNOWN_UNSUPPORTED = {
    "phimoe": "PhiMoE's sparsemixer routing has no exact dense equivalent",
    "gpt_oss": "GPT-OSS experts use a clamped SwiGLU with biases; not supported yet",
    "dbrx": "DBRX is not supported yet",
    "llama4": "Llama 4 is not supported yet",
    "jamba": "Jamba is not supported yet",
}


def supported_families() -> List[str]:
    return [family.name for family in FAMILIES]


def get_family(config: transformers.PretrainedConfig) -> MoEFamily:
    """The adapter for `config`, chosen from config.json alone (never from tensor names)."""
    for family in FAMILIES:
        if family.supports(config):
            return family
    model_type = getattr(config, "model_type", "?")
    supported = ", ".join(supported_families())
    if model_type in KNOWN_UNSUPPORTED:
        raise UnsupportedModelError(
            f"{KNOWN_UNSUPPORTED[model_type]} (model_type {model_type!r}); "
            f"supported MoE families: {supported}"
        )
    if not _looks_sparse(config):
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a Mixture-of-Experts model "
            f"(no expert count in its config); supported MoE families: {supported}"
        )
    raise UnsupportedModelError(
        f"MoE family {model_type!r} is not supported yet; supported: {supported}"
    )


def _looks_sparse(config: transformers.PretrainedConfig) -> bool:
    keys = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
    return any((getattr(config, key, None) or 0) > 1 for key in keys)


__all__ = [
    "FAMILIES",
    "PROJECTIONS",
    "ExpertSlice",
    "MoEFamily",
    "MoELayer",
    "UnsupportedModelError",
    "get_family",
    "supported_families",
]
