# Copyright (C) 2026 the mergekit-moe2dense authors
# SPDX-License-Identifier: LGPL-3.0-only
"""Qwen2-MoE -> Qwen2, keeping the shared expert.

`Qwen2MoeSparseMoeBlock` adds sigmoid(shared_expert_gate(x)) * shared_expert(x)
to the routed mixture. The shared expert becomes one more block of the dense
MLP, its down projection scaled by the calibrated mean of that sigmoid gate
(recorded per MoE layer by a hook on `mlp.shared_expert_gate`). Dense layers
(`mlp_only_layers`, `decoder_sparse_step`) pass through, zero-padded if narrower.
layer_types, sliding_window and max_window_layers are carried as they are.
"""

from __future__ import annotations

import transformers

from mergekit_moe2dense.families.base import MoEFamily
from mergekit_moe2dense.families.common import DENSE_MLP, MLP_EXPERTS, QWEN_SPARSE_LAYERS, shared_mlp
from mergekit_moe2dense.families.qwen3_moe import MOE_CONFIG_KEYS, QWEN_KEYS
from mergekit_moe2dense.families.spec import DenseTarget, Refusal

SHARED_KEYS = ("shared_expert_intermediate_size", "qkv_bias")

# The sparse block of Qwen2-MoE and of the families built on it (Qwen3-Next, Qwen3.5-MoE):
# softmax router, one shared expert scaled per token by sigmoid(shared_expert_gate(x)).
QWEN2_MOE_BLOCK = dict(
    keys=QWEN_KEYS,
    layouts=MLP_EXPERTS,
    shared=shared_mlp(
        "shared_expert",
        width="shared_expert_intermediate_size",
        gate_module="model.layers.{layer}.mlp.shared_expert_gate",
    ),
    extra_tensors={"{block}.shared_expert_gate.weight": (1, "H")},
)

QWEN2_MOE = MoEFamily(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    sparse_layers=QWEN_SPARSE_LAYERS,
    **QWEN2_MOE_BLOCK,
    refusals=(
        Refusal(
            "qkv_bias", False, "Qwen2-MoE with qkv_bias: false has no Qwen2 equivalent (Qwen2 always has q/k/v biases)"
        ),
    ),
    dense=DenseTarget(transformers.Qwen2Config, "Qwen2ForCausalLM", DENSE_MLP, moe_keys=MOE_CONFIG_KEYS + SHARED_KEYS),
    moe_architecture="Qwen2MoeForCausalLM",
)
