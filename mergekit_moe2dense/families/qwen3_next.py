# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen3-Next -> Qwen3-Next with every layer dense (`mlp_only_layers` = all layers).

Qwen3-Next is hybrid: `layer_types` alternates Gated DeltaNet (`linear_attention`) and
gated full attention. Only the MLPs change; every attention layer, linear or full,
passes through unchanged, with its settings (`layer_types`, `linear_*`, partial rotary
`rope_parameters`). Its sparse block is Qwen2-MoE's: routed experts (transformers maps
its checkpoints with the `qwen2_moe` converter: per-expert names or fused), a shared
expert scaled per token by sigmoid(`shared_expert_gate`(x)), which becomes one more
block of the dense MLP, scaled by that gate's calibrated mean. No dense sibling class
has the hybrid attention, so the target is Qwen3-Next itself: a layer listed in
`mlp_only_layers` builds `Qwen3NextMLP` (`mlp.gate_proj/up_proj/down_proj`, width
`intermediate_size`); the MoE keys stay in the config, inert.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, QWEN_SPARSE_LAYERS
from mergekit_moe2dense.families.qwen2_moe import QWEN2_MOE_BLOCK
from mergekit_moe2dense.families.spec import DenseTarget


def _all_dense(config) -> dict:
    return {"mlp_only_layers": list(range(config.num_hidden_layers))}


QWEN3_NEXT = MoEFamily(
    name="qwen3_next",
    model_types=("qwen3_next",),
    sparse_layers=QWEN_SPARSE_LAYERS,
    **QWEN2_MOE_BLOCK,
    dense=DenseTarget(transformers.Qwen3NextConfig, "Qwen3NextForCausalLM", DENSE_MLP, overrides=_all_dense),
    moe_architecture="Qwen3NextForCausalLM",
)
